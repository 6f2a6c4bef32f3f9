"""Small CMU-MOSI / CMU-MOSEI pickles in MMSA's processed format (aligned_50.pkl / unaligned_50.pkl).

Every key MMSA stores is present, with MMSA's types: numpy arrays of str for ``raw_text``, ``id``
and ``annotations``; float arrays for ``text`` (N, L, 768), ``text_bert`` (N, 3, L), ``audio``,
``vision``, ``regression_labels``, ``classification_labels``; Python lists of ints for
``audio_lengths`` / ``vision_lengths`` (unaligned only), features zero-padded after the length.
Audio holds -inf inside real steps (as COVAREP does) and vision one NaN, at seeded positions.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

SIZES = {"train": 6, "valid": 3, "test": 4}
ALIGNED_STEPS = 50
#: unaligned MMSA files give audio and vision their own length (MOSI: 375 / 500)
UNALIGNED_STEPS = {"audio": 12, "vision": 15}
TEXT_STEPS = 50
WORDS = ("it", "was", "really", "not", "good", "bad", "the", "movie", "um", "great")


def make_split(
    count: int,
    *,
    aligned: bool,
    audio_dim: int,
    vision_dim: int,
    rng: np.random.Generator,
    split: str = "train",
) -> dict:
    """One split as MMSA stores it; unaligned lengths include a clip without audio frames (length 0)."""
    steps = {"audio": ALIGNED_STEPS, "vision": ALIGNED_STEPS} if aligned else UNALIGNED_STEPS
    dims = {"audio": audio_dim, "vision": vision_dim}
    split_data: dict = {
        "raw_text": np.array([" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(count)]),
        "id": np.array([f"{split}video{i // 2:02d}$_${i % 2 + 1}" for i in range(count)]),
        "text": rng.standard_normal((count, TEXT_STEPS, 768)).astype(np.float32),
        "text_bert": rng.integers(0, 1000, (count, 3, TEXT_STEPS)).astype(np.float32),
        "regression_labels": np.round(rng.uniform(-3, 3, count), 1).astype(np.float32),
    }
    split_data["regression_labels"][0] = 0.0  # neutral clips exist (they split the Acc-2 conventions)
    split_data["classification_labels"] = np.sign(split_data["regression_labels"]).astype(np.float32) + 1
    names = {0.0: "Neutral", 1.0: "Positive", -1.0: "Negative"}
    split_data["annotations"] = np.array([names[float(np.sign(v))] for v in split_data["regression_labels"]])
    for key in ("audio", "vision"):
        features = rng.standard_normal((count, steps[key], dims[key])).astype(np.float32)
        if not aligned:
            lengths = rng.integers(1, steps[key] + 1, count)
            if key == "audio":
                lengths[-1] = 0
            for i, length in enumerate(lengths):
                features[i, length:] = 0.0
            split_data[f"{key}_lengths"] = [int(length) for length in lengths]
        split_data[key] = features
    split_data["audio"][0, 0, :2] = -np.inf
    split_data["audio"][count // 2, 1, 0] = -np.inf
    split_data["vision"][0, 0, 0] = np.nan
    return split_data


def make_mmsa(
    *,
    aligned: bool = True,
    audio_dim: int = 5,
    vision_dim: int = 20,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    sizes = sizes or SIZES
    return {
        split: make_split(count, aligned=aligned, audio_dim=audio_dim, vision_dim=vision_dim, rng=rng, split=split)
        for split, count in sizes.items()
    }


def write_pickle(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def write_mmsa(root: Path, dataset: str = "MOSI", *, aligned: bool = True, **kwargs) -> dict:
    """Write ``<root>/<dataset>/Processed/{aligned,unaligned}_50.pkl`` and return the data written."""
    data = make_mmsa(aligned=aligned, **kwargs)
    name = "aligned_50.pkl" if aligned else "unaligned_50.pkl"
    write_pickle(root / dataset / "Processed" / name, data)
    return data
