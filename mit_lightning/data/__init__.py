"""LightningDataModules reading the datasets' real on-disk formats.

Configs name them here (``mit_lightning.data.RefCOCODataModule``), as they name fusions and heads."""

from mit_lightning.data.food101 import Food101DataModule
from mit_lightning.data.mmsa import MMSADataModule
from mit_lightning.data.refer import RefCOCODataModule
from mit_lightning.data.snli_ve import SNLIVEDataModule
from mit_lightning.data.synthetic import SyntheticRefCOCODataModule

__all__ = ["Food101DataModule", "MMSADataModule", "RefCOCODataModule", "SNLIVEDataModule",
           "SyntheticRefCOCODataModule"]
