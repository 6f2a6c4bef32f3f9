"""What `mit bench` prints: one JSON line per case, then the ratios between the cases."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence, TextIO

import torch

# what MiT should reach at 7B shapes on one H200 (bf16, text length 48), each compile mode on its own (eager
# against eager, compiled against compiled): (name, ratio-line key, batch, limit, True if the value must stay
# at or below the limit). The peer targets refer to the eager peers.
TARGETS = (
    ("mit_train / floor at batch 8", "mit_over_floor", 8, 1.10, True),
    ("mit_train / floor at batch 32", "mit_over_floor", 32, 1.10, True),
    ("mit_train samples/s at batch 32", "mit_train_samples_per_s", 32, 300.0, False),
    ("mit_inference ms at batch 1", "mit_inference_ms", 1, 15.0, True),
    ("concat_train / mit_train time at batch 8", "concat_over_mit", 8, 4.0, False),
    ("mit_train / concat_train peak memory at batch 8", "mit_over_concat_memory", 8, 0.5, True),
)


class Report:
    """Prints one JSON line per case (and writes it to `output`), keeping the records for the ratios."""

    def __init__(self, scale: str, device: torch.device, text_length: int, steps: int, output: TextIO | None,
                 precision: str = "32", trainable_dtype: str = "float32") -> None:
        self.common = {"scale": scale, "device": device.type, "precision": precision, "trainable_dtype": trainable_dtype}
        self.text_length = text_length
        self.steps = steps
        self.output = output
        self.records: dict[tuple[str, int], dict[str, Any]] = {}

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if self.output is not None:
            self.output.write(text + "\n")
            self.output.flush()

    def case(self, case: str, batch: int, measured: dict[str, Any], compile: str = "none") -> None:
        ms = measured["ms"]
        record = {
            "case": case, **self.common, "compile": compile, "batch": batch, "text_length": self.text_length,
            "ms": _rounded(ms), "samples_per_s": _rounded(batch * 1000 / ms if ms else None),
            **{key: _rounded(value) for key, value in measured.items() if key != "ms"}, "steps": self.steps,
        }
        self.records[case, batch] = record
        self.emit(record)

    def value(self, case: str, batch: int, key: str) -> float | None:
        return self.records.get((case, batch), {}).get(key)

    def ratio(self, numerator: str, denominator: str, batch: int, key: str = "ms") -> float | None:
        top, bottom = self.value(numerator, batch, key), self.value(denominator, batch, key)
        return _rounded(top / bottom) if top is not None and bottom else None


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def ratios(report: Report, strategies: Sequence[str], batch_sizes: Sequence[int], *,
           with_targets: bool, device: torch.device, compile_modes: Sequence[str] = ("none",)) -> dict[str, Any]:
    """The ratios line: every strategy's step against the floor, every peer's time and MiT's memory against
    each other (`<peer>_over_mit`, `mit_over_<peer>_memory`), MiT's inference and throughput. On a CPU the
    time ratios are given again from CPU time (`..._cpu`). A compiled MiT's figures follow, named
    `<figure>@<mode>` and taken against the floor on the same compiled layers; with targets, each mode's are
    checked on its own (`targets[mode]`)."""
    per_batch = _eager_ratios(report, strategies, batch_sizes, device)
    checked = {"none": check_targets(per_batch)}
    for mode in (mode for mode in compile_modes if mode != "none"):
        compiled = {
            "mit_over_floor": {b: report.ratio(f"mit_train@{mode}", f"floor@{mode}", b) for b in batch_sizes},
            "mit_inference_ms": {b: report.value(f"mit_inference@{mode}", b, "ms") for b in sorted({1, *batch_sizes})},
            "mit_train_samples_per_s": {b: report.value(f"mit_train@{mode}", b, "samples_per_s") for b in batch_sizes},
        }
        checked[mode] = check_targets(compiled)
        per_batch.update({f"{key}@{mode}": values for key, values in compiled.items()})
    line: dict[str, Any] = {"case": "ratios", **report.common, "text_length": report.text_length,
                            "machine": _machine(device)}
    line.update({key: {str(b): value for b, value in values.items()} for key, values in per_batch.items()})
    line["targets"] = {mode: checked[mode] for mode in compile_modes} if with_targets else None
    return line


def _eager_ratios(report: Report, strategies: Sequence[str], batch_sizes: Sequence[int],
                  device: torch.device) -> dict[str, dict[int, float | None]]:
    per_batch: dict[str, dict[int, float | None]] = {}
    clocks = {"ms": "", "cpu_ms": "_cpu"} if device.type == "cpu" else {"ms": ""}
    for key, suffix in clocks.items():
        for strategy in strategies:
            per_batch[f"{strategy}_over_floor{suffix}"] = {
                b: report.ratio(f"{strategy}_train", "floor", b, key) for b in batch_sizes
            }
        for peer in (strategy for strategy in strategies if strategy != "mit"):
            per_batch[f"{peer}_over_mit{suffix}"] = {
                b: report.ratio(f"{peer}_train", "mit_train", b, key) for b in batch_sizes
            }
    for peer in (strategy for strategy in strategies if strategy != "mit"):
        per_batch[f"mit_over_{peer}_memory"] = {
            b: report.ratio("mit_train", f"{peer}_train", b, "peak_memory_mib") for b in batch_sizes
        }
    per_batch["mit_inference_ms"] = {b: report.value("mit_inference", b, "ms") for b in sorted({1, *batch_sizes})}
    per_batch["mit_train_samples_per_s"] = {b: report.value("mit_train", b, "samples_per_s") for b in batch_sizes}
    return per_batch


def check_targets(per_batch: dict[str, dict[int, float | None]]) -> dict[str, dict[str, Any] | None]:
    """The figures MiT is meant to reach at 7B shapes on one H200; None where a case was not measured (a
    compiled mode measures MiT's figures only)."""
    checked: dict[str, dict[str, Any] | None] = {}
    for name, key, batch, limit, at_most in TARGETS:
        if key not in per_batch:
            continue
        value = per_batch.get(key, {}).get(batch)
        met = None if value is None else (value <= limit if at_most else value >= limit)
        checked[name] = None if value is None else {"value": value, "limit": limit, "met": met}
    return checked


def target_lines(targets: dict[str, dict[str, dict[str, Any] | None]]) -> list[str]:
    """The targets as sentences: each figure, its limit, and met / NOT met / not measured."""
    lines = []
    for mode, checked in targets.items():
        for name, result in checked.items():
            if result is None:
                lines.append(f"[{mode}] {name}: not measured")
                continue
            relation = "<=" if next(t for t in TARGETS if t[0] == name)[4] else ">="
            verdict = "met" if result["met"] else "NOT met"
            lines.append(f"[{mode}] {name}: {result['value']} (target {relation} {result['limit']}): {verdict}")
    return lines


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"
