"""The comparison's plots: the test metric against trainable parameters and against step time (mean ± sd
over seeds), and every strategy's validation curve on one chart (mean over seeds). Written as PNG beside
comparison.md and into a TensorBoard log in the comparison folder (`tensorboard --logdir <folder>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mit_lightning.compare.stats import spread
from mit_lightning.compare.table import Row, by_strategy, values

PLOTS = {"params": "metric_vs_parameters.png", "step_time": "metric_vs_step_time.png",
         "curves": "validation_curves.png"}


def validation_curve(run_directory: Path, tag: str) -> dict[int, float]:
    """step → value of the scalar `tag` in a run's TensorBoard events (the newest file that has it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(run_directory.rglob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime,
                         reverse=True):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            return {event.step: event.value for event in accumulator.Scalars(tag)}
    return {}


def _scatter(axes, rows: Sequence[Row], key: str, cost_key: str, label: str, log_x: bool) -> None:
    for strategy, runs in by_strategy(rows).items():
        y, x = values(runs, key), values(runs, cost_key, cost=True)
        if not y or not x:
            continue
        y_spread, x_spread = spread(y.values()), spread(x.values())
        axes.errorbar(x_spread.mean, y_spread.mean, yerr=y_spread.sd or 0.0, xerr=x_spread.sd or 0.0, fmt="o",
                      capsize=3, label=strategy)
        axes.annotate(strategy, (x_spread.mean, y_spread.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(label)


def figures(rows: Sequence[Row], metric_key: str, metric_label: str,
            curves: dict[str, list[dict[int, float]]], curve_tag: str) -> dict[str, object]:
    """The three matplotlib figures, by the keys of PLOTS."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    made = {}
    for name, cost_key, label, log_x in (("params", "trainable_parameters", "trainable parameters", True),
                                          ("step_time", "step_ms", "training step time (ms)", False)):
        figure, axes = pyplot.subplots(figsize=(6, 4.5))
        _scatter(axes, rows, metric_key, cost_key, label, log_x)
        axes.set_ylabel(f"test {metric_label} (mean ± sd over seeds)")
        axes.grid(alpha=0.3)
        made[name] = figure
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for strategy, runs in curves.items():
        steps = sorted(set().union(*runs)) if runs else []
        points = [(step, spread([run[step] for run in runs if step in run]).mean) for step in steps]
        if points:
            axes.plot(*zip(*points), marker=".", label=strategy)
    axes.set_xlabel("training step")
    axes.set_ylabel(f"{curve_tag} (mean over seeds)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    made["curves"] = figure
    return made


def write_plots(folder: Path, rows: Sequence[Row], metric_key: str, metric_label: str,
                run_directories: dict[str, list[Path]]) -> list[Path]:
    """PNG files in `folder` and the same figures in TensorBoard (`folder`/tensorboard); their paths."""
    from matplotlib import pyplot
    from torch.utils.tensorboard import SummaryWriter

    curve_tag = f"val/{metric_label}"
    curves = {strategy: [curve for curve in (validation_curve(path, curve_tag) for path in paths) if curve]
              for strategy, paths in run_directories.items()}
    made = figures(rows, metric_key, metric_label, curves, curve_tag)
    written = []
    writer = SummaryWriter(str(folder / "tensorboard"))
    try:
        for name, figure in made.items():
            path = folder / PLOTS[name]
            figure.tight_layout()
            figure.savefig(path, dpi=110)
            written.append(path)
            writer.add_figure(f"comparison/{name}", figure, close=False)
            pyplot.close(figure)
    finally:
        writer.close()
    return written
