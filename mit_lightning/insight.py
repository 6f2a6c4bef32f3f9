"""MiT's own quantities, drawn: the per-head gate σ(L') and the size of each infusion, over many samples.

`MiT.observe()` records them during forward passes; `summarise` gathers them per infused layer, and the
charts here (matplotlib) are what TensorBoard shows each validation epoch (`tensorboard.InfusionStatistics`)
and what `mit inspect` writes as PNG files.
"""

from __future__ import annotations

from typing import Mapping

import torch

#: what is recorded per layer, and how it is called on the charts
QUANTITIES = {
    "gate": "gate σ(L')",
    "key": "|K^r − K| / |K|",
    "value": "|V^r − V| / |V|",
    "ffn": "|H' − H| / |H| (FFN)",
}


def summarise(observed: Mapping[str, Mapping[str, list[torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """layer → quantity → (samples, heads) values, the batches recorded by `MiT.observe` put together."""
    return {
        layer: {name: torch.cat(values) for name, values in quantities.items() if values}
        for layer, quantities in observed.items()
        if any(quantities.values())
    }


def gate_figure(summary: Mapping[str, Mapping[str, torch.Tensor]]):
    """One panel per infused layer: the distribution of σ(L') over samples, one box per head."""
    layers = [layer for layer, quantities in summary.items() if "gate" in quantities]
    figure, axes = _panels(len(layers))
    for axis, layer in zip(axes, layers):
        gates = summary[layer]["gate"].numpy()
        axis.boxplot(gates, showfliers=False)
        axis.set_title(f"layer {layer}")
        axis.set_xlabel("head")
        axis.set_ylim(0, 1)
    axes[0].set_ylabel(QUANTITIES["gate"])
    figure.suptitle("MiT gates σ(L') per head over the samples")
    figure.tight_layout()
    return figure


def size_figure(summary: Mapping[str, Mapping[str, torch.Tensor]]):
    """The relative size of the infusion of K, V and the FFN activation, per layer: median and 10–90% range."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6))
    layers = list(summary)
    for offset, name in enumerate(("key", "value", "ffn")):
        present = [layer for layer in layers if name in summary[layer]]
        if not present:
            continue
        positions = [layers.index(layer) + (offset - 1) * 0.22 for layer in present]
        values = [summary[layer][name].flatten() for layer in present]
        medians = [float(value.median()) for value in values]
        low = [median - float(value.quantile(0.1)) for median, value in zip(medians, values)]
        high = [float(value.quantile(0.9)) - median for median, value in zip(medians, values)]
        axis.errorbar(positions, medians, yerr=[low, high], fmt="o", capsize=3, label=QUANTITIES[name])
    axis.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    axis.set_ylabel("relative change")
    axis.set_title("Size of the infusion (median, 10–90% of samples)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _panels(count: int):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, max(count, 1), figsize=(3.2 * max(count, 1), 3.4), squeeze=False, sharey=True)
    return figure, list(axes[0])
