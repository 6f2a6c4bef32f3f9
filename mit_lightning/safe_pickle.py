"""A restricted unpickler for data files: a dataset must never be able to run code.

`refs(unc).p` (RefCOCO) and the MMSA feature pickles are plain data, so only containers, scalars,
strings and (for MMSA) numpy arrays are admitted; anything else — `os.system`, `eval`, arbitrary
classes — is refused before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from mit_lightning.errors import UserError

_PLAIN = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}
_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class UnsafePickleError(UserError):
    """The pickle asked for something other than plain data."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, allowed: set[tuple[str, str]], source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"Refusing to load '{self._source}': it asks for '{module}.{name}', which is not plain data. "
            "Data files may only hold containers, numbers, strings (and numpy arrays for feature files). "
            "If this file comes from the official distribution, re-download it; otherwise do not use it."
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"Refusing to load '{self._source}': it uses persistent ids, which plain data never does.")


def load_data_pickle(path: str | Path, *, allow_numpy: bool = False):
    """Load a pickle of plain data; Python 2 pickles fall back to latin-1 for byte strings."""
    path = Path(path)
    allowed = _PLAIN | (_NUMPY if allow_numpy else set())
    payload = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(payload), allowed=allowed, source=str(path)).load()
    except UnicodeDecodeError:
        return _RestrictedUnpickler(io.BytesIO(payload), allowed=allowed, source=str(path), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise UserError(f"Cannot read '{path}': it is not a valid pickle ({error}). Re-download the file.") from error
