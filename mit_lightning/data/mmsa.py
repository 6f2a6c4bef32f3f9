"""CMU-MOSI / CMU-MOSEI from the MMSA processed feature pickles (multimodal sentiment analysis).

Layout: ``<root>/<MOSI|MOSEI>/Processed/{aligned_50,unaligned_50}.pkl``, one dict with ``train``,
``valid`` and ``test``, each a dict of arrays (see data/README.md). MiT reads ``raw_text`` through
the LLM's tokenizer (as a prompt), the ``audio`` (COVAREP) and ``vision`` (FACET) frame sequences
through trainable encoders, and regresses ``regression_labels`` in [-3, 3]. The BERT features
(``text``, ``text_bert``) are not used and are dropped after loading.

MMSA's ``vision`` key holds facial-expression features, not pixels: it is served as ``facial`` so
that it is never confused with the CLIP ``image`` of the other tasks.

Bad input follows `mit_lightning.data.records`: labels that are NaN, infinite or outside [-3, 3]
(e.g. scaled by 100) are an error naming the split and an example id, since they make every metric
wrong; a clip whose ``raw_text`` is not text (null, a number) is excluded and reported; bytes
texts are decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mit_lightning.data.base import DataSpec, MiTDataModule, PromptFormat
from mit_lightning.data.records import SetupReport, as_text, decode_bytes
from mit_lightning.errors import UserError, check_choice, existing_path, expand_env
from mit_lightning.safe_pickle import load_data_pickle

log = logging.getLogger(__name__)

#: the feature sequences served
Modality = Literal["audio", "facial"]
#: served modality name -> MMSA key of its feature sequence (lengths under "<key>_lengths")
MODALITY_KEYS: dict[Modality, str] = {"audio": "audio", "facial": "vision"}
#: MMSA's regression labels are mean annotator scores on this scale
LABEL_RANGE = (-3.0, 3.0)
DEFAULT_PROMPT = "Predict the sentiment of the following text: {text}. #Sentiment:"


@dataclass
class _Sequence:
    features: np.ndarray  # (N, T, D) float32, finite
    lengths: np.ndarray  # (N,) int64 in [1, T]


@dataclass
class _SplitArrays:
    texts: list[str]
    ids: list[str]
    labels: np.ndarray  # (N,) float32
    sequences: dict[str, _Sequence]


class MMSASplit(Dataset):
    """One split; items follow the batch contract of `mit_lightning.data.base`."""

    def __init__(self, arrays: _SplitArrays, prompt: PromptFormat) -> None:
        self.arrays = arrays
        self.prompts = [prompt.fill(text) for text in arrays.texts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = self.arrays
        item: dict[str, Any] = {
            "prompt": self.prompts[index],
            "index": index,
            "label": float(arrays.labels[index]),
            "text": arrays.texts[index],
            "id": arrays.ids[index],
        }
        for name, sequence in arrays.sequences.items():
            features = torch.from_numpy(sequence.features[index])
            item[name] = features
            item[f"{name}_mask"] = torch.arange(features.shape[0]) < int(sequence.lengths[index])
        return item


class MMSADataModule(MiTDataModule):
    """CMU-MOSI / CMU-MOSEI sentiment regression from MMSA's aligned or unaligned feature pickles.

    Items: ``prompt``, ``index``, ``label`` (float in [-3, 3]), ``text`` (raw), ``id``
    ("video$_$clip"), and per served modality ``<name>`` float32 (T, D) with ``<name>_mask`` bool
    (T,), True for real steps. Aligned pickles carry no lengths, so every step is real; unaligned
    lengths are clipped to [1, T]: a clip without frames keeps its first (zero) step, so an encoder
    never attends over an all-padding sequence. -inf / +inf / NaN features are replaced by 0 and
    counted in the log. Feature sizes are read from the file (MOSI 5/20, MOSEI 74/35).

    Args:
        root: folder holding ``MOSI/`` and ``MOSEI/`` (environment variables are expanded).
        dataset: MOSI or MOSEI.
        file: path of an MMSA pickle to read instead of the one under ``root`` (``dataset`` then
            only names it in messages; ``aligned`` still says how to read lengths).
        aligned: read ``aligned_50.pkl`` (word-aligned, T=50) instead of ``unaligned_50.pkl``.
        modalities: sequences to serve, any of ``audio`` and ``facial`` (MMSA's ``vision``);
            empty for text only.
        prompt_template: the LLM prompt; ``{text}`` is replaced by the sample's raw text.
        max_sequence_length: keep at most this many (first) steps of every sequence.
        train_split: split to train on.
        val_splits: splits to validate on.
        test_splits: splits to test on.
        predict_splits: splits to predict on (default: the test splits).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: batch_size).
        num_workers: dataloader worker processes.
        pin_memory: pin batches in page-locked memory when a GPU is used.
    """

    layout_hint = "See data/README.md (CMU-MOSI / CMU-MOSEI) for the expected layout."

    def __init__(
        self,
        root: str = "${MIT_DATA_ROOT:-data}",
        dataset: Literal["MOSI", "MOSEI"] = "MOSI",
        file: str | None = None,
        aligned: bool = True,
        modalities: Sequence[Modality] = ("audio", "facial"),
        prompt_template: str = DEFAULT_PROMPT,
        max_sequence_length: int | None = None,
        train_split: str = "train",
        val_splits: Sequence[str] = ("valid",),
        test_splits: Sequence[str] = ("test",),
        predict_splits: Sequence[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(
            root,
            train_split=train_split,
            val_splits=val_splits,
            test_splits=test_splits,
            predict_splits=predict_splits,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            check_root=False,  # the file check below names the exact file that is missing
        )
        self.dataset = dataset
        self.modalities = list(dict.fromkeys(modalities))
        for name in self.modalities:
            check_choice("Each of data.modalities", name, Modality)
        self.prompt_format = PromptFormat(prompt_template, strip=True)
        if max_sequence_length is not None and max_sequence_length < 1:
            raise UserError(f"data.max_sequence_length must be at least 1 (or unset), got {max_sequence_length}.")
        self.aligned = aligned
        self.max_sequence_length = max_sequence_length
        name = "aligned_50.pkl" if aligned else "unaligned_50.pkl"
        expected = file if file is not None else str(Path(expand_env(root)) / self.dataset / "Processed" / name)
        self.path = existing_path(expected, f"{self.dataset} feature file", self.layout_hint, is_dir=False)
        self._arrays: dict[str, _SplitArrays] | None = None

    @property
    def dataset_name(self) -> str:
        return self.dataset

    def _configured_splits(self) -> list[str]:
        splits = [self.train_split, *self.val_splits, *self.test_splits, *self.predict_splits]
        return list(dict.fromkeys(splits))

    def _load(self) -> dict[str, _SplitArrays]:
        """Parse the pickle once, keeping only what is served for the configured splits."""
        if self._arrays is None:
            data = load_data_pickle(self.path, allow_numpy=True)
            if not isinstance(data, dict):
                raise UserError(
                    f"'{self.path}' holds a {type(data).__name__}, not MMSA's dict of splits. {self.layout_hint}"
                )
            missing = [split for split in self._configured_splits() if split not in data]
            if missing:
                raise UserError(
                    f"'{self.path}' has no split {missing}; it has {sorted(map(str, data))}. "
                    "Set data.train_split / val_splits / test_splits to those names."
                )
            self._arrays = {split: self._parse_split(split, data[split]) for split in self._configured_splits()}
            self._report_repeated_ids()
        return self._arrays

    def _report_repeated_ids(self) -> None:
        """A clip listed twice counts twice in a metric; one in two splits is evaluated on what was trained on."""
        first_split: dict[str, str] = {}
        report = SetupReport(str(self.path))
        for split, arrays in self._arrays.items():
            seen: set[str] = set()
            for id_ in arrays.ids:
                if id_ in seen:
                    report.note(f"id {id_}", f"clips listed more than once in split '{split}' (each copy counts)")
                elif first_split.setdefault(id_, split) != split:
                    report.note(f"id {id_}", "clips in more than one split (evaluated on what was trained on)")
                seen.add(id_)
        report.log()

    def _parse_split(self, split: str, raw: Any) -> _SplitArrays:
        where = f"'{self.path}' split '{split}'"
        if not isinstance(raw, dict):
            raise UserError(f"{where} is a {type(raw).__name__}, not a dict of arrays. {self.layout_hint}")
        required = ["raw_text", "id", "regression_labels"]
        for name in self.modalities:
            key = MODALITY_KEYS[name]
            required += [key] if self.aligned else [key, f"{key}_lengths"]
        missing = [key for key in required if key not in raw]
        if missing:
            hint = "" if self.aligned else " (unaligned files carry lengths: is this an aligned file? set data.aligned=true)"
            raise UserError(f"{where} lacks {missing}{hint}. {self.layout_hint}")
        raw_texts = _entries(raw["raw_text"], where, "raw_text")
        count = len(raw_texts)
        ids = [decode_bytes(value) if isinstance(value, bytes) else str(value)
               for value in _entries(raw["id"], where, "id", count)]
        labels = _numeric(raw["regression_labels"], where, "regression_labels").reshape(-1)
        if labels.shape[0] != count:
            raise UserError(f"{where}: regression_labels has {labels.shape[0]} values for {count} texts.")
        _check_labels(labels, ids, where)
        report = SetupReport(f"{self.dataset} {split}")
        texts = [as_text(value, f"id {id_}", report) for value, id_ in zip(raw_texts, ids)]
        for text, id_ in zip(texts, ids):
            if text is None:
                report.exclude(f"id {id_}", "clips whose raw_text is not text (null, empty, a number, ...)")
        report.log()
        if self.aligned and any(f"{MODALITY_KEYS[name]}_lengths" in raw for name in self.modalities):
            log.warning("%s has sequence lengths but data.aligned=true: every step is read as real.", where)
        sequences = {name: self._parse_sequence(split, name, raw, ids) for name in self.modalities}
        kept = [i for i, text in enumerate(texts) if text is not None]
        if len(kept) < count:  # rare: only then are the arrays copied
            labels = labels[kept]
            sequences = {name: _Sequence(seq.features[kept], seq.lengths[kept]) for name, seq in sequences.items()}
        return _SplitArrays(texts=[texts[i] for i in kept], ids=[ids[i] for i in kept], labels=labels,
                            sequences=sequences)

    def _parse_sequence(self, split: str, name: str, raw: dict, ids: list[str]) -> _Sequence:
        """The feature sequences of one modality, non-finite values replaced by 0 and lengths clipped to [1, T];
        what was replaced or clipped is counted in one warning, naming the first clips by id."""
        key, count = MODALITY_KEYS[name], len(ids)
        where = f"'{self.path}' split '{split}'"
        features = _numeric(raw[key], where, key)
        if features.ndim != 3 or features.shape[0] != count:
            raise UserError(f"{where}: '{key}' has shape {features.shape}; expected ({count}, steps, features).")
        if count and 0 in features.shape[1:]:
            raise UserError(f"{where}: '{key}' has shape {features.shape}: clips without any step or features hold "
                            f"nothing to encode. Re-export the file, or leave '{name}' out of data.modalities.")
        stored_steps = features.shape[1]
        if self.max_sequence_length is not None:
            features = features[:, : self.max_sequence_length]
        steps = features.shape[1]
        if self.aligned:
            lengths = np.full(count, steps, dtype=np.int64)
        else:
            length_key = f"{key}_lengths"
            lengths = _numeric(_vector(raw[length_key], where, length_key, count), where, length_key)
            if not np.isfinite(lengths).all():
                raise UserError(f"{where}: '{length_key}' holds NaN or infinite lengths. Re-export the file.")
            lengths = np.rint(lengths).astype(np.int64)
        report = SetupReport(f"{self.dataset} {split} {name}")
        for position in np.flatnonzero(lengths < 1):
            report.repair(f"id {ids[position]}", "clips without frames, served as one zero step")
        for position in np.flatnonzero(lengths > stored_steps):
            report.repair(f"id {ids[position]}", f"clips longer than the {stored_steps} steps stored, read as "
                                                 f"{stored_steps}")
        lengths = lengths.clip(1, steps)
        non_finite = ~np.isfinite(features)
        if non_finite.any():
            _report_non_finite(features, non_finite, lengths, ids, report)
            features[non_finite] = 0.0
        report.log()
        return _Sequence(features=np.ascontiguousarray(features), lengths=lengths)

    def _read_splits(self, splits: list[str]) -> dict[str, _SplitArrays]:
        arrays = self._load()
        return {split: arrays[split] for split in splits}

    def _make_dataset(self, split: str, arrays: _SplitArrays, *, training: bool) -> Dataset:
        return MMSASplit(arrays, self.prompt_format)

    def _build_spec(self) -> DataSpec:
        dims: dict[str, int] = {}
        for split, arrays in self._load().items():
            for name, sequence in arrays.sequences.items():
                size = sequence.features.shape[2]
                if dims.setdefault(name, size) != size:
                    raise UserError(
                        f"'{self.path}': '{name}' features have {dims[name]} dims in one split and {size} in '{split}'."
                    )
        return DataSpec(sequence_dims=dims)


def _report_non_finite(features: np.ndarray, non_finite: np.ndarray, lengths: np.ndarray, ids: list[str],
                       report: SetupReport) -> None:
    """Count what is replaced by 0, and name the clips left with no finite value in their real steps."""
    bad = features[non_finite]  # small: counting on it avoids more full-size masks
    counts = {"-inf": np.isneginf(bad).sum(), "+inf": np.isposinf(bad).sum(), "NaN": np.isnan(bad).sum()}
    log.warning("%s: %d non-finite feature values replaced by 0 (%s).", report.where, bad.size,
                ", ".join(f"{number} {kind}" for kind, number in counts.items() if number))
    real = np.arange(features.shape[1])[None, :] < lengths[:, None]
    for position in np.flatnonzero((non_finite.all(axis=2) | ~real).all(axis=1)):
        report.repair(f"id {ids[position]}", "clips with no finite feature at all, served as zeros")


def _check_labels(labels: np.ndarray, ids: list[str], where: str) -> None:
    """NaN, infinite or out-of-range labels are an error: they would make every metric wrong without a word."""
    low, high = LABEL_RANGE
    bad = np.flatnonzero(~np.isfinite(labels) | (labels < low) | (labels > high))
    if bad.size:
        first = int(bad[0])
        raise UserError(
            f"{where}: {bad.size} regression_labels are non-finite or outside [{low:g}, {high:g}] (e.g. id "
            f"'{ids[first]}': {labels[first]:g}). MMSA labels are sentiment scores in [{low:g}, {high:g}]: "
            "re-download the file, or undo the scaling it was saved with."
        )


def _entries(value: Any, where: str, key: str, count: int | None = None) -> Sequence[Any]:
    """The entries of a per-sample list or 1-D array as stored (a list is not forced into one dtype)."""
    entries = value if isinstance(value, (list, tuple)) else _vector(value, where, key)
    if count is not None and len(entries) != count:
        raise UserError(f"{where}: '{key}' has shape ({len(entries)},); expected ({count},).")
    return entries


def _vector(value: Any, where: str, key: str, count: int | None = None) -> np.ndarray:
    """A 1-D array of `count` entries (lists and numpy arrays both occur in MMSA files)."""
    array = np.asarray(value)
    if array.ndim != 1 or (count is not None and array.shape[0] != count):
        expected = f"({count},)" if count is not None else "one entry per sample"
        raise UserError(f"{where}: '{key}' has shape {array.shape}; expected {expected}.")
    return array


def _numeric(value: Any, where: str, key: str) -> np.ndarray:
    """A writeable float32 array: the loaded one itself when it already is (nothing else holds it, so
    cleaning it in place is safe and MOSEI's large arrays are not copied)."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: '{key}' is not numeric ({error}).") from error
    return array if array.flags.writeable else array.copy()
