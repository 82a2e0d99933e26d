"""Lightning side of mlflow-recycle: prompt tuning, rank-classification evaluation, distillation, data."""

from .callbacks import BestPrompt, ProgressLog, stop_above
from .data import TextClassificationDataModule, read_examples
from .distillation import PromptDistillationModule, UnlabelledPairDataModule
from .modules import PromptTuningModule, RankClassificationModule, TrainablePromptModule, build_optimizer
from .training import FitOutcome, TrainerFactory, fit_prompt

__all__ = [
    "BestPrompt",
    "FitOutcome",
    "ProgressLog",
    "PromptDistillationModule",
    "PromptTuningModule",
    "RankClassificationModule",
    "TextClassificationDataModule",
    "TrainablePromptModule",
    "TrainerFactory",
    "UnlabelledPairDataModule",
    "build_optimizer",
    "fit_prompt",
    "read_examples",
    "stop_above",
]
