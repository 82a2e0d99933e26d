"""Lightning side of mlflow-recycle: prompt tuning, rank-classification evaluation, distillation, data."""

from .data import TextClassificationDataModule, read_examples
from .distillation import PromptDistillationModule, UnlabelledPairDataModule
from .modules import PromptTuningModule, RankClassificationModule

__all__ = [
    "PromptDistillationModule",
    "PromptTuningModule",
    "RankClassificationModule",
    "TextClassificationDataModule",
    "UnlabelledPairDataModule",
    "read_examples",
]
