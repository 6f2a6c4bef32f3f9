"""Task heads: what the fused text feature is turned into, with the task's loss and metrics.

Chosen in the config by class path: `mit_lightning.heads.ReferringSegmentation`,
`ImageTextClassification`, `SentimentRegression`.
"""

from mit_lightning.heads.base import TaskHead
from mit_lightning.heads.classification import ImageTextClassification
from mit_lightning.heads.segmentation import ReferringSegmentation
from mit_lightning.heads.sentiment import SentimentRegression

__all__ = ["TaskHead", "ReferringSegmentation", "ImageTextClassification", "SentimentRegression"]
