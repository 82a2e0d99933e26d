"""Lightning side of mlflow-recycle: prompt tuning, rank-classification evaluation, distillation, data."""

from .callbacks import BestPrompt, ProgressLog, stop_above
from .data import TextClassificationDataModule, long_enough, read_examples
from .distillation import MapDistillationModule, PromptDistillationModule, UnlabelledPairDataModule
from .modules import (
    OptimizerFactory,
    PromptTuningModule,
    RankClassificationModule,
    SchedulerFactory,
    TrainablePromptModule,
    adamw,
)
from .stacked import StackedPromptTuningModule, fit_prompts
from .training import FitOutcome, MapFitOutcome, TrainerFactory, fit_map, fit_prompt

__all__ = [
    "BestPrompt",
    "FitOutcome",
    "MapDistillationModule",
    "MapFitOutcome",
    "OptimizerFactory",
    "ProgressLog",
    "PromptDistillationModule",
    "PromptTuningModule",
    "RankClassificationModule",
    "SchedulerFactory",
    "StackedPromptTuningModule",
    "TextClassificationDataModule",
    "TrainablePromptModule",
    "TrainerFactory",
    "UnlabelledPairDataModule",
    "adamw",
    "fit_map",
    "fit_prompt",
    "fit_prompts",
    "long_enough",
    "read_examples",
    "stop_above",
]
