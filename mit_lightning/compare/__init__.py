"""`mit compare`: train fusion strategies on one config with the same data, seed and budget; one table.

Each strategy is a config overlay in configs/peers/, named by its file stem (mit, concat,
text_only, late_addition, ...): adding a file adds a strategy. Every chosen strategy is checked
first (config parsed, weights and data found), then each one runs as
`mit fit --config <config> --config configs/peers/<name>.yaml --test_after_fit true` in a process of
its own, in runs/compare/version_<N>/<name>/seed_<s>/ (a new folder per comparison, so none is
overwritten), once per seed with `--seeds N`; a comparison stopped by Ctrl-C or SIGTERM, which its runs
save on, is continued by the same command.
A process per strategy keeps the figures comparable: each starts from the same state (no allocator
cache or RNG left behind by the one before), its peak memory is its own, multi-GPU trainer
settings launch as with `mit fit`, and a strategy that fails leaves the others running.

The table (printed, and written to comparison.md and comparison.csv in that folder): the head's
summary test metrics (e.g. oIoU and mIoU), trainable parameters, the median training-step time and
the peak memory during training, measured by the `TrainingCost` callback added to every run; with
several seeds, mean ± standard deviation and each strategy paired with MiT by seed (mean difference and
its 95% t interval, `stats.py`). Plots beside it (`plots.py`): the metric against trainable parameters
and against step time, and every validation curve on one chart (PNG and TensorBoard). Each peer keeps its
overlay's optimiser recipe unless `--same-optimizer` gives all the task config's.

    mit compare                                   # the demo, every strategy, 3 epochs each
    mit compare --seeds 3 --same-optimizer
    mit compare --strategies mit concat --epochs 12
    mit compare --config configs/refcoco.yaml --strategies mit concat -- --trainer.precision bf16-mixed
"""

from mit_lightning.compare.cli import main
from mit_lightning.compare.cost import TrainingCost

__all__ = ["TrainingCost", "main"]
