"""What TensorBoard shows besides the scalars: predictions on fixed samples and MiT's gates, every validation epoch.

- `PredictionPreviews`: the same validation samples every epoch, drawn as the model answers them now:
  segmentation, the image with the predicted mask (red) and the true mask's outline (green) and the expression;
  classification, the image with its text and the predicted / true label; sentiment, predicted against true
  scores.
- `InfusionStatistics`: MiT's per-head gate σ(L') and the size of the infusion of K, V and the FFN activation over
  the validation samples, as histograms, curves and charts (`mit_lightning.insight`).

Both write to the run's TensorBoard logger (nothing without one) on rank zero.
"""

from __future__ import annotations

import textwrap
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from mit_lightning import insight
from mit_lightning.data.base import collate


def _tensorboard(trainer):
    experiment = getattr(trainer.logger, "experiment", None)
    return experiment if trainer.is_global_zero and hasattr(experiment, "add_figure") else None


def close_figure(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


class PredictionPreviews(Callback):
    """Draws the model's answers on `samples` fixed validation samples (first validation split) each epoch.

    Args:
        samples: how many images are drawn (classification, segmentation); sentiment plots up to 32× as many.
    """

    def __init__(self, samples: int = 8) -> None:
        self.samples = samples

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        experiment = _tensorboard(trainer)
        datamodule = trainer.datamodule
        splits = getattr(datamodule, "val_splits", None)
        if experiment is None or trainer.sanity_checking or not splits:
            return
        dataset = datamodule.datasets[splits[0]]
        task = pl_module.head.task
        count = min(len(dataset), self.samples * (32 if task == "sentiment" else 1))
        indices = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()  # the same every epoch
        batch = collate([dataset[index] for index in dict.fromkeys(indices)])
        if not batch["prompt"]:
            return
        batch = {key: value.to(pl_module.device) if isinstance(value, torch.Tensor) else value
                 for key, value in batch.items()}
        with torch.no_grad(), trainer.precision_plugin.forward_context():  # as validation runs the model
            output = pl_module(batch)
        figure = DRAW[task](pl_module, output, batch)
        if figure is not None:
            experiment.add_figure(f"previews/{task}", figure, global_step=trainer.global_step)
            close_figure(figure)


def grid(count: int):
    import matplotlib.pyplot as plt

    columns = min(count, 4)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return figure, list(axes.flat)


def _draw_segmentation(pl_module, output, batch) -> Any:
    from mit_lightning.data.images import load_rgb
    from mit_lightning.metrics.segmentation import mask_statistics, per_sample_iou

    masks = pl_module.head.masks(output, batch["mask"])
    ious = per_sample_iou(mask_statistics(masks, batch["mask"])).tolist()
    figure, axes = grid(len(masks))
    for axis, mask, truth, path, sentence, iou in zip(axes, masks, batch["mask"], batch["image_path"],
                                                     batch["sentence"], ious):
        mask, truth = mask.cpu().numpy().astype(bool), truth.cpu().numpy().astype(bool)
        image = np.asarray(load_rgb(path).resize((mask.shape[1], mask.shape[0])), dtype=np.float32)
        image[mask] = 0.45 * image[mask] + 0.55 * np.array([230, 25, 25])
        axis.imshow(image.astype(np.uint8))
        axis.contour(truth, levels=[0.5], colors=["#00e676"], linewidths=1.5)
        axis.set_title(f"{textwrap.shorten(sentence, 34)}\nIoU {iou:.2f}", fontsize=9)
    figure.suptitle("red: predicted mask · green: true mask", fontsize=10)
    figure.tight_layout()
    return figure


def _draw_classification(pl_module, output, batch) -> Any:
    names = (pl_module.data_spec.class_names if pl_module.data_spec else None) or None
    predicted = pl_module.head.predict(output, batch)["prediction"].tolist()
    figure, axes = grid(len(predicted))
    label = (lambda index: names[index] if names else str(index))
    for axis, image, text, guess, truth in zip(axes, batch["image"], batch["text"], predicted, batch["label"].tolist()):
        pixels = image.float().cpu()
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min() + 1e-6)
        axis.imshow(pixels.permute(1, 2, 0).numpy())
        colour = "#1b5e20" if guess == truth else "#b71c1c"
        axis.set_title(f"{textwrap.shorten(text, 34)}\npredicted {label(guess)} · true {label(truth)}", fontsize=9,
                       color=colour)
    figure.tight_layout()
    return figure


def _draw_sentiment(pl_module, output, batch) -> Any:
    import matplotlib.pyplot as plt

    predicted = pl_module.head.predict(output, batch)["prediction"].flatten().numpy()
    truth = batch["label"].float().cpu().numpy()
    figure, axis = plt.subplots(figsize=(4.2, 4))
    axis.scatter(truth, predicted, s=12, alpha=0.7)
    axis.plot([-3, 3], [-3, 3], color="grey", linewidth=1)
    axis.set(xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), xlabel="true score", ylabel="predicted score",
             title=f"{len(truth)} validation samples")
    figure.tight_layout()
    return figure


#: task → the figure of a batch's answers
DRAW = {"segmentation": _draw_segmentation, "classification": _draw_classification, "sentiment": _draw_sentiment}


class InfusionStatistics(Callback):
    """MiT's gates σ(L') and infusion sizes over the validation samples, each validation epoch, in TensorBoard:
    a histogram per layer and head (`mit/gate/layer<n>/head<h>`), per layer for K, V and FFN
    (`mit/infusion_<key|value|ffn>/layer<n>`), their means as curves, and both charts of `insight`."""

    def __init__(self) -> None:
        self._recording = ExitStack()
        self._observed: dict | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        observe = getattr(pl_module.fusion, "observe", None)
        if observe is not None and not trainer.sanity_checking and _tensorboard(trainer) is not None:
            self._observed = self._recording.enter_context(observe())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._observed is None:
            return
        self._recording.close()
        summary, self._observed = insight.summarise(self._observed), None
        if summary:
            log_infusion(_tensorboard(trainer), summary, trainer.global_step)


def log_infusion(experiment, summary: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    for layer, quantities in summary.items():
        for name, values in quantities.items():
            tag = "gate" if name == "gate" else f"infusion_{name}"
            if name == "gate":
                for head in range(values.shape[1]):
                    experiment.add_histogram(f"mit/gate/layer{layer}/head{head}", values[:, head], step)
            else:
                experiment.add_histogram(f"mit/{tag}/layer{layer}", values, step)
            experiment.add_scalar(f"mit/{tag}_mean/layer{layer}", float(values.mean()), step)
    for name, draw in (("gates", insight.gate_figure), ("infusion_size", insight.size_figure)):
        if name == "gates" and not any("gate" in quantities for quantities in summary.values()):
            continue
        figure = draw(summary)
        experiment.add_figure(f"mit/{name}", figure, step)
        close_figure(figure)
