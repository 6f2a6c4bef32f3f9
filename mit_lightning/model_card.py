"""The README.md of an export folder: what the adapter is, what it was trained on, how well it did, how to load it.

Written from the adapter itself (backbones, fusion, head, data spec) and the run it came from: its data
config and the test metrics `mit test` left in the run folder, where there are some.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mit_lightning.experiments import RESULTS_FILE, read_results


def run_metrics(checkpoint: Path) -> dict[str, float] | None:
    """The test metrics of the run a checkpoint belongs to (`<run>/checkpoints/x.ckpt` → `<run>/test_metrics.json`)."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        path = folder / RESULTS_FILE
        if checkpoint.is_file() and path.is_file():
            return read_results(path)
    return None


def _class_name(entry: Any) -> str:
    path = entry.get("class_path", "") if isinstance(entry, dict) else ""
    return path.rsplit(".", 1)[-1] or "—"


def _settings(settings: dict[str, Any] | None) -> str:
    return ", ".join(f"{key} {json.dumps(value)}" for key, value in (settings or {}).items()) or "defaults"


def _backbone(entry: dict[str, Any] | None, what: str) -> str:
    if not entry:
        return f"- {what}: none"
    fingerprint = json.dumps(entry.get("fingerprint"), sort_keys=True)
    return f"- {what}: `{Path(str(entry.get('path'))).name}` (fingerprint `{fingerprint}`)"


def model_card(adapter, name: str, data: dict[str, Any] | None, metrics: dict[str, float] | None) -> str:
    """Markdown for `adapter` (an `adapters.Adapter`) exported as folder `name`; `data`: its data config."""
    model = adapter.model
    fusion, head = model.get("fusion") or {}, model.get("head") or {}
    spec = adapter.data_spec
    lines = [
        f"# {name}",
        "",
        f"A **{adapter.task}** adapter of mit-lightning (Multimodal Infusion Tuning): the trained part only, "
        f"{adapter.parameter_count:,} parameters, run on frozen backbones it does not contain.",
        "",
        "## Backbones (frozen, not included)",
        "",
        _backbone(adapter.backbones.get("llm"), "LLM"),
        _backbone(adapter.backbones.get("vision"), "vision tower"),
        "",
        "A model is refused on backbones with another fingerprint; give their location when loading (below).",
        "",
        "## Model",
        "",
        f"- fusion: `{_class_name(fusion)}` ({_settings(fusion.get('init_args'))})",
        f"- head: `{_class_name(head)}` ({_settings(head.get('init_args'))})",
        f"- trained in precision `{adapter.precision}`",
        f"- prompt: `{spec.prompt.template if spec.prompt else '—'}`",
    ]
    if spec.class_names:
        shown = ", ".join(spec.class_names[:20]) + (", ..." if len(spec.class_names) > 20 else "")
        lines.append(f"- classes ({len(spec.class_names)}): {shown}")
    if spec.sequence_dims:
        lines.append("- feature sequences: " + ", ".join(f"{key} (steps × {size})" for key, size in spec.sequence_dims.items()))
    lines += ["", "## Data", ""]
    lines.append(f"`{_class_name(data)}` ({_settings((data or {}).get('init_args'))})"
                 if data else "Not recorded.")
    lines += ["", "## Test metrics of the run", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {metric} | {value:.4f} |" for metric, value in sorted(metrics.items())]
    else:
        lines.append("None were found beside the checkpoint (`mit test` writes them).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from mit_lightning import load_model",
        "",
        f'model = load_model("{name}")  # llm_path=..., clip_weights=... where the backbones are elsewhere',
        "model.predict(...)             # one input; model.predict_batch([...]) for many",
        "```",
        "",
        f"or `mit serve --ckpt_path {name}` (a web page and an HTTP API).",
        "",
    ]
    return "\n".join(lines)
