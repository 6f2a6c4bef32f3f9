"""The names evaluation metrics are logged under, and read back by (`test_metrics.json`, tables).

`<stage>/<split>/<metric>`, except that a split named like its stage is not repeated: the "test" split's
oIoU is `test/oIoU`, RefCOCO's testA split's is `test/testA/oIoU`.
"""

from __future__ import annotations

from typing import Mapping


def metric_name(stage: str, split: str | None, metric: str) -> str:
    """The logged name of `metric` on `split` (None: the stage's only split) in `stage` ("val", "test")."""
    if split is None or split == stage:
        return f"{stage}/{metric}"
    return f"{stage}/{split}/{metric}"


def split_of(name: str) -> str | None:
    """The split a metric name was logged for: its stage's own split for `<stage>/<metric>`; None if not a metric."""
    parts = name.split("/")
    if len(parts) == 2:
        return parts[0]
    return parts[1] if len(parts) == 3 else None


def metric_of(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def current_names(results: Mapping[str, float]) -> dict[str, float]:
    """Results written under the earlier names (`test/test/oIoU`) as they are named now (`test/oIoU`)."""
    renamed = {}
    for name, value in results.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == parts[1]:
            name = metric_name(parts[0], parts[1], parts[2])
        renamed[name] = value
    return renamed
