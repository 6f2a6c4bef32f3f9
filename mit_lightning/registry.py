"""The closed set of classes a stored run config (a checkpoint's or an export's) may name.

A checkpoint is a file anyone can hand over. The run config inside it is data: every class it names
is looked up here, by exact name, and nothing outside this list is ever imported on its behalf. The
list holds the project's own classes and, from PyTorch and Lightning, the classes (never functions)
its configs use; each can be written as its public path (``torch.optim.AdamW``) or as the path of
the module that defines it (``torch.optim.adamw.AdamW``), the two spellings a config dump uses.

Classes the user names in their own ``--config`` files or on the command line are theirs to trust
(`mit_lightning.config_safety`); they are never added here.
"""

from __future__ import annotations

import importlib
from functools import cache

#: public import path of every class a stored config may name
CLASS_PATHS = (
    # the project's own
    "mit_lightning.fusion.MiT",
    "mit_lightning.fusion.TokenConcat",
    "mit_lightning.fusion.PILL",
    "mit_lightning.fusion.ModeX",
    "mit_lightning.fusion.TextOnly",
    "mit_lightning.fusion.LateAddition",
    "mit_lightning.heads.ReferringSegmentation",
    "mit_lightning.heads.ImageTextClassification",
    "mit_lightning.heads.SentimentRegression",
    "mit_lightning.data.RefCOCODataModule",
    "mit_lightning.data.SyntheticRefCOCODataModule",
    "mit_lightning.data.Food101DataModule",
    "mit_lightning.data.SNLIVEDataModule",
    "mit_lightning.data.MMSADataModule",
    "mit_lightning.schedules.WarmupCosine",
    "mit_lightning.resume.LatestCheckpoint",
    "mit_lightning.callbacks.PredictionWriter",
    "mit_lightning.progress.LineProgress",
    "mit_lightning.tensorboard.PredictionPreviews",
    "mit_lightning.tensorboard.InfusionStatistics",
    "mit_lightning.compare.cost.TrainingCost",
    "mit_lightning.release_evaluation.ReleaseEvaluation",
    # PyTorch optimizers and schedules (those that take plain settings; LambdaLR & co. take functions)
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "torch.optim.RMSprop",
    "torch.optim.Adagrad",
    "torch.optim.Adadelta",
    "torch.optim.Adamax",
    "torch.optim.NAdam",
    "torch.optim.RAdam",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
    "torch.optim.lr_scheduler.LinearLR",
    "torch.optim.lr_scheduler.ConstantLR",
    "torch.optim.lr_scheduler.PolynomialLR",
    "torch.optim.lr_scheduler.OneCycleLR",
    "lightning.pytorch.cli.ReduceLROnPlateau",
    # Lightning callbacks, loggers and strategies
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.callbacks.ModelSummary",
    "lightning.pytorch.callbacks.RichModelSummary",
    "lightning.pytorch.callbacks.Timer",
    "lightning.pytorch.callbacks.StochasticWeightAveraging",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.strategies.DDPStrategy",
    "lightning.pytorch.strategies.FSDPStrategy",
    "lightning.pytorch.strategies.SingleDeviceStrategy",
)


def _load(path: str) -> type:
    module, _, name = path.rpartition(".")
    value = getattr(importlib.import_module(module), name)
    if not isinstance(value, type):
        raise TypeError(f"registry entry {path} is not a class")
    return value


@cache
def registered_classes() -> dict[str, type]:
    """Every accepted spelling → its class. Imports only the modules listed above (the project, torch, Lightning)."""
    spellings: dict[str, type] = {}
    for path in CLASS_PATHS:
        cls = _load(path)
        spellings[path] = cls
        spellings[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return spellings


def registered_class(name: object) -> type | None:
    """The class a stored config's class path names, or None if it is not in the registry (nothing is imported)."""
    return registered_classes().get(name) if isinstance(name, str) else None


def class_path_of(cls: type) -> str:
    """The public path of a registered class (how a config should name it)."""
    return next(path for path in CLASS_PATHS if registered_classes()[path] is cls)
