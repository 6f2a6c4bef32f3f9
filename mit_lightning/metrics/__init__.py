"""torchmetrics `Metric`s for the paper's tasks, correct under DDP (each sample counted once)."""
