"""Lightning side of mlflow-recycle: prompt tuning, rank-classification evaluation, data."""

from .data import TextClassificationDataModule, read_examples
from .modules import PromptTuningModule, RankClassificationModule

__all__ = ["PromptTuningModule", "RankClassificationModule", "TextClassificationDataModule", "read_examples"]
