"""The method code (fusions, heads, metrics, the batch contract) is plain PyTorch: it runs without Lightning."""

from __future__ import annotations

import subprocess
import sys


def test_the_method_code_imports_no_lightning():
    code = ("import sys; import mit_lightning.fusion, mit_lightning.heads, mit_lightning.metrics, mit_lightning.batch; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'lightning'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
