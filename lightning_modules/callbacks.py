"""Callbacks for prompt training: keep the best validation prompt, stop once a gate is passed.

A prompt is a few kilobytes, so the best one is kept in memory (what ``ModelCheckpoint``
with ``save_top_k=1`` does on disk) and works the same under every strategy, FSDP
included, through :meth:`TrainablePromptModule.tuned_prompt`.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar

log = logging.getLogger(__name__)


class ProgressLog(L.Callback):
    """A log line every ``every_seconds`` of training (and at the end): step, budget, the latest
    metrics. For output that is not a terminal (a file, CI), where a progress bar says nothing."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_seconds and trainer.global_step < trainer.max_steps:
            return
        self._last = now
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
        values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        log.info("%s: step %d of %d%s", getattr(pl_module, "name", "training"), trainer.global_step,
                 trainer.max_steps, f" ({values})" if values else "")  # fmt: skip


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counted in steps: a prompt trains for ``max_steps``, not
    epochs, so the bar's total is the steps left (not the epoch's batches) and its description
    drops the stock ``Epoch 0/-2`` (``max_epochs`` is -1)."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        if self.trainer.max_steps > 0:
            return min(total, self.trainer.max_steps - self.trainer.global_step)
        return total

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps > 0:
            return f"Training: steps {self.trainer.global_step + 1}-{self.trainer.max_steps}"
        return super()._get_train_description(current_epoch)


class BestPrompt(L.Callback):
    """Keep the prompt with the best ``monitor`` value seen at validation (``mode="max"`` or ``"min"``).

    After ``fit``: ``best_prompt`` (None when no validation ran), ``best_score`` and
    ``best_step`` (the optimizer step it was reached at).
    """

    def __init__(self, monitor: str, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_prompt: torch.Tensor | None = None
        self.best_step: int | None = None

    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self._validated(trainer, pl_module, float(trainer.callback_metrics[self.monitor]))

    def _validated(self, trainer: L.Trainer, pl_module: L.LightningModule, score: float) -> None:
        """A validation's ``monitor`` value, once per validation (a subclass may check it further)."""
        self._consider(trainer, pl_module, score)

    def _consider(self, trainer: L.Trainer, pl_module: L.LightningModule, score: float) -> None:
        if score == score and self._better(score):  # NaN (an empty split) never counts
            self.best_score, self.best_step = score, trainer.global_step
            self.best_prompt = pl_module.tuned_prompt()


def stop_above(
    monitor: str, threshold: float | None, *, patience: int | None = None, start: float | None = None
) -> EarlyStopping:
    """Stop training at the first validation whose ``monitor`` is strictly above ``threshold`` (the gate).

    Lightning's ``EarlyStopping`` with a stopping threshold. Without ``patience`` only the gate
    or the step budget (``max_steps``) ends the run; with it, also ``patience`` validations in a
    row that do not improve on the best value so far, counted from ``start`` (the score of the
    prompt training starts from) when given, so that a run that never beats its start stops
    after ``patience`` validations instead of spending its budget.
    """
    stopping = EarlyStopping(
        monitor=monitor,
        mode="max",
        stopping_threshold=threshold,
        patience=2**31 if patience is None else patience,
        check_on_train_epoch_end=False,
        check_finite=False,
        verbose=False,
    )
    if start is not None:
        stopping.best_score = torch.tensor(float(start))
    return stopping
