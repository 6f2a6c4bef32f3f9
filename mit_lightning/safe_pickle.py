"""A restricted unpickler for data files: a dataset must never be able to run code, nor make us
allocate much more memory than the file holds.

`refs(unc).p` (RefCOCO) and the MMSA feature pickles are plain data, so only containers, scalars,
strings and (for MMSA) numpy arrays are admitted; anything else — `os.system`, `eval`, arbitrary
classes — is refused before it is called.

What a pickle can make us allocate is bounded by its own size: every allowed constructor builds
its object from data carried in the file. `bytearray(n)` (n zero bytes from one small number) is
therefore not admitted, and of the codecs only the latin-1 encoding Python 3 writes bytes with. numpy arrays are rebuilt only the way numpy writes them — an empty array
whose `__setstate__` then receives the contents — and that state is checked before numpy sees it:
raw bytes must be exactly as many as the shape needs, an object array's list exactly as long
(numpy itself reads past a short list), and dtypes must be plain (no structured or sub-array
dtypes, whose field layout a file could forge). Arrays are returned as plain `numpy.ndarray`.

Before any of that, the opcodes are walked once (`check_declared_sizes`): the C unpickler allocates what
an opcode declares (a byte string's length, a memo index) before reading it, so a 20-byte file declaring
a 1 TB string, or a memo slot at index 2**31, would otherwise be a MemoryError or an exhausted machine.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mit_lightning.errors import UserError

class UnsafePickleError(UserError):
    """The pickle asked for something other than plain data."""


class _Refused(Exception):
    """Raised inside unpickling by the checked constructors; the message completes "the file ..."."""


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """How Python 3 writes `bytes` at pickle protocols 0-2: ``_codecs.encode(text, "latin1")``; no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"asks for the codec call encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


def _empty_bytes() -> bytes:
    """How Python 3 writes ``b""`` at pickle protocols 0-2; `bytes(n)` itself would allocate n bytes."""
    return b""


_PLAIN: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


#: stands for `numpy.ndarray` in a pickle: accepted by `_reconstruct`, not callable itself
#: (``ndarray(shape, dtype)`` would allocate whatever shape the file names)
_ARRAY_CLASS = object()
#: numpy's own pickling functions, found as pickles find them (numpy 2 moved their module)
_numpy_reconstruct = np.empty(0).__reduce__()[0]
_numpy_scalar = np.float32(0).__reduce__()[0]
_numpy_frombuffer = np.empty(1).__reduce_ex__(5)[0]


def _check_dtype(dtype: Any, *, allow_object: bool) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"asks for an array of {type(dtype).__name__}, which is not a numpy dtype")
    if dtype == np.dtype(object) and allow_object:
        return dtype
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"asks for the numpy dtype {dtype}, which plain feature arrays never use")
    return dtype


class _CheckedArray(np.ndarray):
    """The empty array `_reconstruct` returns; its state is checked against its size before numpy reads it."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("holds a numpy array state of an unknown form")
        _, shape, dtype, _, data = state
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise _Refused(f"holds a numpy array of shape {shape!r}")
        dtype = _check_dtype(dtype, allow_object=True)
        count = math.prod(shape)
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise _Refused(f"holds an object array of shape {shape} without exactly {count} items")
        elif not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
            raise _Refused(f"holds a numpy array of shape {shape} whose bytes do not match its size")
        super().__setstate__(state)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _CheckedArray:
    """numpy's `_reconstruct`, limited to what numpy writes: an empty ndarray, filled by `__setstate__`."""
    if subtype is not _ARRAY_CLASS or shape != (0,):
        raise _Refused("asks numpy for an array other than the empty one numpy's own pickles start from")
    return _numpy_reconstruct(_CheckedArray, (0,), b"b")


def _scalar(dtype: Any, data: Any = None) -> Any:
    return _numpy_scalar(_check_dtype(dtype, allow_object=False), data)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """Protocol 5 arrays: a view of bytes the file carries, so their size is bounded by the file."""
    if not isinstance(buffer, (bytes, bytearray)):
        raise _Refused("asks for a numpy array over something other than bytes")
    return _numpy_frombuffer(buffer, _check_dtype(dtype, allow_object=False), shape, order)


_NUMPY: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _ARRAY_CLASS, ("numpy", "dtype"): np.dtype}
for _module in ("numpy.core", "numpy._core"):
    _NUMPY[(f"{_module}.multiarray", "_reconstruct")] = _reconstruct
    _NUMPY[(f"{_module}.multiarray", "scalar")] = _scalar
    _NUMPY[(f"{_module}.numeric", "_frombuffer")] = _frombuffer


def _plain_arrays(value: Any) -> Any:
    """`value` with every `_CheckedArray` (inside containers and object arrays) as a plain ndarray view."""
    if isinstance(value, _CheckedArray):
        value = value.view(np.ndarray)
        if value.dtype.hasobject:
            for index in np.ndindex(value.shape):
                value[index] = _plain_arrays(value[index])
        return value
    if isinstance(value, dict):
        return {key: _plain_arrays(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_arrays(item) for item in value)
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, allowed: dict[tuple[str, str], Any], source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise UnsafePickleError(
            f"Refusing to load '{self._source}': it asks for '{module}.{name}', which is not plain data. "
            "Data files may only hold containers, numbers, strings (and numpy arrays for feature files). "
            "If this file comes from the official distribution, re-download it; otherwise do not use it."
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"Refusing to load '{self._source}': it uses persistent ids, which plain data never does.")


# --- sizes declared by opcodes ------------------------------------------------------------------------
_COUNT_FORMATS = {pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"), pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
                  pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
                  pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q")}
_FIXED, _COUNTED, _LINES, _MEMO_INDEX, _MEMO_LINE, _FRAME, _STOP = range(7)


def _opcode_table() -> list[tuple[int, int, struct.Struct | None] | None]:
    """By opcode byte: (kind, argument width or line count, format of a declared number); None = no opcode."""
    table: list[tuple[int, int, struct.Struct | None] | None] = [None] * 256
    for op in pickletools.opcodes:
        width = op.arg.n if op.arg else 0
        if op.name in ("BINPUT", "LONG_BINPUT"):
            entry = (_MEMO_INDEX, width, struct.Struct("<B" if width == 1 else "<I"))
        elif op.name == "PUT":
            entry = (_MEMO_LINE, 1, None)
        elif op.name == "FRAME":
            entry = (_FRAME, width, struct.Struct("<Q"))
        elif op.name == "STOP":
            entry = (_STOP, 0, None)
        elif width >= 0:
            entry = (_FIXED, width, None)
        elif width == pickletools.UP_TO_NEWLINE:
            entry = (_LINES, 2 if op.arg.name == "stringnl_noescape_pair" else 1, None)
        else:
            entry = (_COUNTED, _COUNT_FORMATS[width].size, _COUNT_FORMATS[width])
        table[ord(op.code)] = entry
    return table


_OPCODES = _opcode_table()


def check_declared_sizes(data: bytes) -> None:
    """Walk the opcodes without building anything; raise `_Refused` where one declares more than the file holds.

    A byte or text string, a long integer or a frame must fit in the bytes that follow; a memo index may not
    exceed the number of opcodes read so far (writers number their memo entries in order).
    """
    size, position, count, table, find = len(data), 0, 0, _OPCODES, data.find
    while position < size:
        code = data[position]
        entry = table[code]
        position += 1
        count += 1
        if entry is None:
            raise _Refused(f"holds the byte {code:#04x} at offset {position - 1} where an opcode belongs (not a pickle)")
        kind, width, number = entry
        if kind == _FIXED:
            position += width
        elif kind == _COUNTED:
            if position + width > size:
                break
            declared = number.unpack_from(data, position)[0]
            position += width
            if not 0 <= declared <= size - position:
                raise _Refused(f"declares a value of {declared:,} bytes at offset {position - width - 1}, but only "
                               f"{size - position:,} bytes follow")
            position += declared
        elif kind in (_LINES, _MEMO_LINE):
            for _ in range(width):
                end = find(b"\n", position)
                if end < 0:
                    raise _Refused(f"ends inside the text argument at offset {position}")
                if kind == _MEMO_LINE and not data[position:end].strip().isdigit():
                    raise _Refused(f"holds a memo index {data[position:end][:20]!r} that is not a number")
                if kind == _MEMO_LINE and int(data[position:end]) > count:
                    raise _Refused(f"declares the memo index {int(data[position:end]):,} after {count:,} opcodes")
                position = end + 1
        elif kind == _MEMO_INDEX or kind == _FRAME:
            if position + width > size:
                break
            declared = number.unpack_from(data, position)[0]
            if kind == _MEMO_INDEX and declared > count:
                raise _Refused(f"declares the memo index {declared:,} after {count:,} opcodes")
            if kind == _FRAME and declared > size - position - width:
                raise _Refused(f"declares a frame of {declared:,} bytes, but only {size - position - width:,} follow")
            position += width
        else:  # STOP: the unpickler reads no further
            return
    raise _Refused("ends before its last opcode (truncated)")


def load_data_pickle(path: str | Path, *, allow_numpy: bool = False):
    """Load a pickle of plain data; Python 2 pickles fall back to latin-1 for byte strings."""
    path = Path(path)
    allowed = _PLAIN | (_NUMPY if allow_numpy else {})
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise UserError(f"Cannot read '{path}' ({error.strerror or error}).") from None
    try:
        check_declared_sizes(payload)
        try:
            data = _RestrictedUnpickler(io.BytesIO(payload), allowed=allowed, source=str(path)).load()
        except UnicodeDecodeError:
            data = _RestrictedUnpickler(io.BytesIO(payload), allowed=allowed, source=str(path), encoding="latin1").load()
        return _plain_arrays(data) if allow_numpy else data
    except _Refused as error:
        raise UnsafePickleError(f"Refusing to load '{path}': it {error}. Re-download the file.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RecursionError) as error:
        raise UserError(f"Cannot read '{path}': it is not a valid pickle ({error}). Re-download the file.") from error
