"""Screenshots of a run's TensorBoard panels in headless Chromium, to look at them.

    python tests/tensorboard_screenshots.py runs/demo/tensorboard OUT/

writes OUT/previews.png (the answers on fixed validation samples), OUT/gates_chart.png (MiT's gate and infusion
size charts) and OUT/gate_histograms.png (the gate histograms of the first infused layer of the demo).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers.headless_chromium import Chromium  # noqa: E402

PANELS = {"previews": "previews", "gates_chart": "mit/gates|mit/infusion_size", "gate_histograms": "mit/gate/layer2/"}
SEARCH = "document.querySelector('input[placeholder=\"Filter tags (regex)\"]')"


def main(logdir: str, out: str, chromium: str = "chromium") -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "data/runs", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        with Chromium(chromium, folder / "profile") as browser:
            for name, tags in PANELS.items():
                page = browser.open(url + "#timeseries", height=1100)
                page.wait_for(SEARCH, timeout=90)
                page.evaluate(f"{SEARCH}.value = {tags!r}; {SEARCH}.dispatchEvent(new Event('input', {{bubbles: true}}))")
                time.sleep(12)  # the cards and their pictures load
                print(page.screenshot(folder / f"{name}.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
