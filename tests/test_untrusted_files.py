"""Files from elsewhere — data pickles, checkpoints, exports — are read as data and end, when they are
wrong, in one line naming the file: never a MemoryError, an exhausted machine, a traceback, or a model
whose weights are garbage answering as if nothing were wrong."""

from __future__ import annotations

import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest

from mit_lightning.errors import UserError
from mit_lightning.safe_pickle import load_data_pickle

TB = 2**40


def _declared(opcode: bytes, fmt: str, value: int, protocol: int = 4) -> bytes:
    return b"\x80" + bytes([protocol]) + opcode + struct.pack(fmt, value) + b"abc."


#: (file content, what the message says): each a few bytes that declare far more than they hold
HOSTILE_PICKLES = {
    "binbytes8-1TB": (_declared(b"\x8e", "<Q", TB), "declares a value of 1,099,511,627,776 bytes"),
    "binunicode8-1TB": (_declared(b"\x8d", "<Q", TB), "declares a value of 1,099,511,627,776 bytes"),
    "bytearray8-1TB": (_declared(b"\x96", "<Q", TB, protocol=5), "declares a value of 1,099,511,627,776 bytes"),
    "binbytes-4GB": (_declared(b"B", "<I", 2**32 - 1, protocol=3), "declares a value of 4,294,967,295 bytes"),
    "binunicode-4GB": (_declared(b"X", "<I", 2**32 - 1), "declares a value of 4,294,967,295 bytes"),
    "long4-2GB": (_declared(b"\x8b", "<i", 2**31 - 1, protocol=2), "declares a value of 2,147,483,647 bytes"),
    "binstring-negative": (b"T" + struct.pack("<i", -5) + b"abc.", "declares a value of -5 bytes"),
    "frame-1TB": (b"\x80\x04\x95" + struct.pack("<Q", TB) + b"N.", "declares a frame of 1,099,511,627,776 bytes"),
    "long-binput-2G": (b"\x80\x02]r" + struct.pack("<I", 2**31) + b".", "memo index 2,147,483,648"),
    "binput-after-one-op": (b"\x80\x02]q\xff.", "memo index 255"),
    "text-put-2G": (b"(lp2147483648\n.", "memo index 2,147,483,648"),
    "text-put-not-a-number": (b"(lpx\n.", "not a number"),
    "truncated": (pickle.dumps(list(range(100)), protocol=2)[:50], "truncated"),
    "empty": (b"", "truncated"),
    "text-file": (b"hello world\n", "not a pickle"),
    "unsupported-protocol": (b"\x80\x09N.", "unsupported pickle protocol"),
    "huge-decimal-int": (b"I" + b"9" * 100_000 + b"\n.", "not a valid pickle"),
    "out-of-band-buffer": (b"\x80\x05\x97.", "out-of-band"),
    "line-without-end": (b"S'abc", "ends inside the text argument"),
}


@pytest.mark.parametrize("content, message", HOSTILE_PICKLES.values(), ids=HOSTILE_PICKLES.keys())
@pytest.mark.parametrize("allow_numpy", [False, True], ids=["refs", "features"])
def test_a_pickle_declaring_more_than_it_holds_is_one_line_before_anything_is_allocated(tmp_path, content, message,
                                                                                         allow_numpy):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=str(path).replace("(", r"\(").replace(")", r"\)")) as error:
            load_data_pickle(path, allow_numpy=allow_numpy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(error.value) and "\n" not in str(error.value)
    assert peak < 4 * 2**20


def test_a_folder_given_as_a_pickle_is_one_line(tmp_path):
    with pytest.raises(UserError, match="Cannot read"):
        load_data_pickle(tmp_path)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_of_plain_data_with_memo_and_frames_still_loads(tmp_path, protocol):
    shared = {"sent": "the dog", "raw": b"caf\xc3\xa9".decode()}
    data = [{"ref_id": index, "sentences": [shared, shared], "big": "x" * 70_000, "n": 2**70} for index in range(300)]
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_data_pickle(path) == data
