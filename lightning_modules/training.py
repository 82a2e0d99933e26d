"""One way to train a prompt: a step budget, validation every K steps, the best validation
prompt kept, and an optional early stop as soon as a gate is passed.

Prompt tuning (on the source model, and re-tuning on a new base) and label-free
distillation all train through :func:`fit_prompt`, so their budgets, stop rules and
records mean the same thing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from mlflow_recycle.compute import Compute, metered

from .callbacks import BestPrompt, ProgressLog, StepProgressBar, stop_above
from .distillation import MapDistillationModule
from .modules import TrainablePromptModule

#: Builds a Lightning trainer; keyword arguments override its configured ones. At the entry
#: points: ``hydra.utils.instantiate(cfg.trainer, _partial_=True)``.
TrainerFactory = Callable[..., L.Trainer]


@dataclass(frozen=True)
class FitOutcome:
    """What a prompt training run produced and what it cost.

    Attributes:
        prompt: the best validation prompt, or the last one when no validation ran.
        steps: optimizer steps taken (below the budget when the gate stopped it early).
        seconds: wall time of the run, validations included.
        compute: the model passes it made (:mod:`mlflow_recycle.compute`), validations included.
        score: validation accuracy of ``prompt`` (None without validation).
        best_step: the step ``prompt`` was taken at (None without validation).
        stopped_early: the gate was passed before the budget ran out.
        plateaued: training stopped before its budget because ``patience`` validations in a
            row did not improve on the best score so far (counted from ``start_score``).
    """

    prompt: torch.Tensor
    steps: int
    seconds: float
    score: float | None
    best_step: int | None
    stopped_early: bool
    plateaued: bool = False
    compute: Compute = field(default_factory=Compute)


def progress(trainer: TrainerFactory) -> list[L.Callback]:
    """How a training run shows its progress: a step-counted bar in a terminal, log lines
    elsewhere (a log file or CI, where a bar writes nothing readable), none when the trainer
    config turns the bar off."""
    if not sys.stderr.isatty():
        return [ProgressLog()]
    return [StepProgressBar()] if getattr(trainer, "keywords", {}).get("enable_progress_bar", True) else []


@dataclass(frozen=True)
class MapFitOutcome:
    """What training a map on behaviour produced (:func:`fit_map`) and what it cost.

    Attributes:
        state: the trained tensors (:meth:`MapDistillationModule.trained_state`).
        steps, seconds, compute: as :class:`FitOutcome`'s.
        agreement: the share of the last batch on which student and teacher agreed.
    """

    state: dict[str, torch.Tensor]
    steps: int
    seconds: float
    agreement: float | None
    compute: Compute = field(default_factory=Compute)


def fit_map(
    module: MapDistillationModule, trainer: TrainerFactory, *, steps: int, train_dataloaders: Any
) -> MapFitOutcome:
    """Train ``module``'s map for ``steps`` optimizer steps (no validation: a map serves every
    prompt of its task, and each recycled prompt is judged by the policy's gate)."""
    fit: L.Trainer = trainer(
        max_steps=steps,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        limit_val_batches=0,
        logger=False,
        callbacks=progress(trainer),
    )
    start = time.perf_counter()
    with metered() as used:
        fit.fit(module, train_dataloaders=train_dataloaders)
    agreement = fit.callback_metrics.get(f"{module.name}/agreement")
    return MapFitOutcome(
        module.trained_state(),
        fit.global_step,
        time.perf_counter() - start,
        None if agreement is None else float(agreement),
        used,
    )


def fit_prompt(
    module: TrainablePromptModule,
    trainer: TrainerFactory,
    *,
    steps: int,
    eval_every: int | None = None,
    stop_above_score: float | None = None,
    patience: int | None = None,
    start_score: float | None = None,
    metric: str = "accuracy",
    datamodule: L.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    **trainer_kwargs: Any,
) -> FitOutcome:
    """Train ``module``'s prompt for at most ``steps`` optimizer steps.

    With ``eval_every``, the prompt is validated every that many steps (and at the end) on
    the validation data, and the best one is returned; with ``stop_above_score`` too,
    training stops at the first validation strictly above it; with ``patience``, also after
    that many validations in a row without improving on the best score so far, the first
    compared with ``start_score`` (the starting prompt's) when given. ``metric`` (accuracy or
    macro_f1) is what "best" and "above" are measured in. Without ``eval_every`` no
    validation runs and the last prompt is returned.
    """
    monitor = f"{module.name}/validation_{metric}"
    callbacks: list[L.Callback] = list(trainer_kwargs.pop("callbacks", None) or []) + progress(trainer)
    best = BestPrompt(monitor)
    if eval_every:
        callbacks.append(best)
        if stop_above_score is not None or patience is not None:
            callbacks.append(stop_above(monitor, stop_above_score, patience=patience, start=start_score))
        validation = {"val_check_interval": min(eval_every, steps), "limit_val_batches": 1.0}
    else:
        validation = {"limit_val_batches": 0}
    trainer_kwargs.setdefault("logger", False)
    fit: L.Trainer = trainer(
        max_steps=steps,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        callbacks=callbacks,
        **validation,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    with metered() as used:
        fit.fit(module, datamodule=datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders)
        taken = fit.global_step
        if eval_every and taken % min(eval_every, steps) and not fit.should_stop:
            # the steps after the last validation (BestPrompt sees this validation too)
            fit.validate(module, datamodule=datamodule, dataloaders=val_dataloaders, verbose=False)
    seconds = time.perf_counter() - start
    if best.best_prompt is None:
        return FitOutcome(module.tuned_prompt(), taken, seconds, None, None, False, compute=used)
    stopped = stop_above_score is not None and best.best_score > stop_above_score
    plateaued = fit.should_stop and not stopped and taken < steps
    return FitOutcome(best.best_prompt, taken, seconds, best.best_score, best.best_step, stopped, plateaued, used)
