"""Records are checked when a split is set up, so that bad input is met before training, not mid-epoch.

Every data module treats bad input the same way:

- **The file is wrong** — not in its format, a record without its identifiers, targets that cannot
  be right (NaN, outside their range), image sizes that disagree with the annotations, a split
  left with no sample: a `UserError` at setup naming the file and an example record. These
  affect the whole file, so carrying on would give a wrong number without a word.
- **A record carries no usable text** (null, missing, not a string): the record is excluded at
  setup and each split logs one warning with the count and the first records.
- **Text in another encoding** is read as it was written: bytes (Python 2 pickles, numpy byte
  arrays) are decoded as UTF-8, or as latin-1 when they are not UTF-8 (as a Python 2 pickle's
  strings are). What no encoding can give back — bytes of a text file that are not UTF-8, lone
  surrogates such as a JSON ``"\\ud800"`` — becomes U+FFFD, and the split logs one warning.
- **An image that cannot be decoded** is met only when loaded: it is skipped at load time and
  reported once per epoch (see `mit_lightning.data.images`).

So the tokenizer only ever receives valid text.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: how many records a warning names before it only counts
RECORDS_SHOWN = 3


class SetupReport:
    """What setting up one split (or reading one file) excluded or repaired, logged as one warning per kind."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._records: dict[tuple[str, str], list[str]] = {}

    def exclude(self, record: str, what: str) -> None:
        """`record` is left out; `what` names the kind in the plural, e.g. "pairs without hypothesis text"."""
        self._records.setdefault(("excluded", what), []).append(record)

    def repair(self, record: str, what: str) -> None:
        """`record` is kept with its text repaired; `what` says how."""
        self._records.setdefault(("repaired", what), []).append(record)

    def note(self, record: str, what: str) -> None:
        """`record` is kept as it is, but the user should know `what` about it."""
        self._records.setdefault(("kept", what), []).append(record)

    def log(self) -> None:
        for (verb, what), records in self._records.items():
            more = ", ..." if len(records) > RECORDS_SHOWN else ""
            log.warning("%s: %s: %d %s (first: %s%s).", self.where, what, len(records), verb,
                        ", ".join(records[:RECORDS_SHOWN]), more)


def decode_bytes(value: bytes) -> str:
    """UTF-8, else latin-1: every byte string is latin-1, the reading Python 2 pickles' strings get."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def as_text(value: Any, record: str, report: SetupReport) -> str | None:
    """`value` as a plain str the tokenizer can take, or None when it is no text at all (not a string, or empty).

    Bytes are decoded (`decode_bytes`); lone surrogates, which no encoding can write, become U+FFFD
    and the record is noted in `report`.
    """
    if isinstance(value, bytes):
        value = decode_bytes(value)
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        report.repair(record, "texts with lone surrogates (not Unicode), each replaced by U+FFFD")
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return str(value)  # numpy's str_ becomes a plain str


def plain_file_name(value: str) -> bool:
    """A file name that stays in its folder: not empty, no path separator, not '.' or '..'."""
    return bool(value) and value not in (".", "..") and "/" not in value and "\\" not in value and "\0" not in value


def decoded_lines(path: Path, report: SetupReport) -> Iterator[str]:
    """The lines of a UTF-8 text file, endings kept (as `open(..., newline="")` gives them).

    A leading byte-order mark (spreadsheet exports) is dropped; bytes that are not UTF-8 become
    U+FFFD and their line is noted in `report`.
    """
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                report.repair(f"{path.name} line {number}", "lines with bytes that are not UTF-8, replaced by U+FFFD")
                yield line.decode("utf-8", "replace")
