"""Several prompts of one task tuned at once on one frozen model, each as if alone.

K prompts form one ``[K, length, dim]`` parameter. A training step reads the batch once per
prompt in one pass and sums the prompts' own losses, so each prompt's gradient is its own
loss's. AdamW is elementwise, so each prompt gets exactly the update it would get alone. Each
prompt keeps its own best validation prompt and its own stop: its gate's bar, or ``patience``
checks without gain from its own start. A stopped prompt leaves the pass (its compute stops)
and its rows are held where they were. :func:`fit_prompts` returns one :class:`FitOutcome`
per prompt, equal to what :func:`~lightning_modules.fit_prompt` gives that prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from mlflow_recycle.compute import Compute, metered
from mlflow_recycle.errors import RecycleError

from .modules import PromptTuningModule
from .training import FitOutcome, TrainerFactory, progress


class StackedPromptTuningModule(PromptTuningModule):
    """:class:`PromptTuningModule` over a stack of prompts (``initial_prompt``: ``[K, length, dim]``).

    ``active`` marks the prompts still training. After a validation, ``results["validation"]``
    holds each prompt's ``accuracy`` and ``macro_f1`` as lists, in stack order (as for any stack
    a :class:`~lightning_modules.RankClassificationModule` scores); a stopped prompt is not scored.
    """

    def __init__(self, model: torch.nn.Module, initial_prompt: torch.Tensor, **kwargs: Any) -> None:
        if initial_prompt.dim() != 3:
            raise RecycleError(f"A stack of prompts is [K, length, dim]; got shape {tuple(initial_prompt.shape)}.")
        if kwargs.get("anchor") is not None:
            raise RecycleError("Stacked tuning has no regularizer: tune a regularised prompt alone (fit_prompt).")
        super().__init__(model, initial_prompt, **kwargs)
        self.active = torch.ones(len(initial_prompt), dtype=torch.bool)
        self._held = initial_prompt.detach().clone().float()

    @property
    def _active_rows(self) -> torch.Tensor:
        """The stack indices of the prompts still training, on the prompt's device."""
        return self.active.nonzero().squeeze(1).to(self.prompt.device)

    def stop(self, k: int) -> None:
        """Take prompt ``k`` out of training, holding its rows where they are."""
        self.active[k] = False
        self._held[k] = self.prompt.detach()[k].float().cpu()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        prompts = self.prompt[self._active_rows]
        if self.objective == "classes":
            losses = self.lm.class_loss(prompts, batch, self.length_normalize)
        else:
            losses = self.lm.loss(prompts, batch)
        self.log(f"{self.name}/train_loss", losses.mean(), prog_bar=True)
        return losses.sum()  # each prompt's gradient is its own loss's

    def _class_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Validation scores the prompts still training; a stopped prompt's scores are NaN (not scored)."""
        active = self._active_rows
        scores = self.lm.class_scores(self.prompt[active], batch, self.length_normalize)  # [A, B, C]
        full = scores.new_full((self.stack, *scores.shape[1:]), float("nan"))
        full[active] = scores
        return full

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stopped prompts get no gradient, but AdamW's momentum and decay would still move them: hold them."""
        if not bool(self.active.all()):
            with torch.no_grad():
                stopped = (~self.active).to(self.prompt.device)
                self.prompt[stopped] = self._held[~self.active].to(self.prompt)


class StackedStops(L.Callback):
    """Each prompt's best validation prompt and its stop, as :class:`~lightning_modules.BestPrompt` and
    :func:`~lightning_modules.stop_above` keep them for one prompt: stop at the first validation
    strictly above the prompt's ``threshold``, or after ``patience`` validations in a row that do not
    improve on its best so far, counted from its ``start`` score."""

    def __init__(
        self,
        metric: str,
        thresholds: Sequence[float | None],
        starts: Sequence[float | None],
        patience: int | None,
    ) -> None:
        self.metric, self.thresholds, self.patience = metric, list(thresholds), patience
        self.watermark = [float("-inf") if s is None else float(s) for s in starts]  # best for the patience count
        self.waits = [0] * len(self.thresholds)
        self.best: list[tuple[float, int, torch.Tensor] | None] = [None] * len(self.thresholds)
        self.stopped_at: list[int | None] = [None] * len(self.thresholds)
        self.passed = [False] * len(self.thresholds)

    def on_validation_end(self, trainer: L.Trainer, module: StackedPromptTuningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = module.results["validation"][self.metric]
        for k in module.active.nonzero().squeeze(1).tolist():
            self._validated(trainer, module, k, scores[k])
        if not bool(module.active.any()):
            trainer.should_stop = True

    def _validated(self, trainer: L.Trainer, module: StackedPromptTuningModule, k: int, score: float) -> None:
        best = self.best[k]
        if score == score and (best is None or score > best[0]):  # NaN (an empty split) never counts
            self.best[k] = (score, trainer.global_step, module.tuned_prompt()[k])
        threshold = self.thresholds[k]
        if threshold is not None and score > threshold:
            self.passed[k] = True
        elif score > self.watermark[k]:
            self.watermark[k], self.waits[k] = score, 0
        else:
            self.waits[k] += 1
        if self.passed[k] or (self.patience is not None and self.waits[k] >= self.patience):
            self.stopped_at[k] = trainer.global_step
            module.stop(k)


def fit_prompts(
    module: StackedPromptTuningModule,
    trainer: TrainerFactory,
    *,
    steps: int,
    eval_every: int,
    thresholds: Sequence[float | None] | None = None,
    patience: int | None = None,
    start_scores: Sequence[float | None] | None = None,
    metric: str = "accuracy",
    datamodule: L.LightningDataModule,
) -> list[FitOutcome]:
    """Train ``module``'s prompts for at most ``steps`` steps, validating every ``eval_every``: one
    :class:`FitOutcome` per prompt, as :func:`~lightning_modules.fit_prompt` returns for one. Seconds and
    compute are split among the prompts by the steps each took."""
    size = module.stack
    stops = StackedStops(metric, thresholds or [None] * size, start_scores or [None] * size, patience)
    fit: L.Trainer = trainer(
        max_steps=steps, check_val_every_n_epoch=None, enable_checkpointing=False, logger=False,
        callbacks=[stops, *progress(trainer)], val_check_interval=min(eval_every, steps), limit_val_batches=1.0,
    )  # fmt: skip
    start = time.perf_counter()
    with metered() as used:
        fit.fit(module, datamodule=datamodule)
        if fit.global_step % min(eval_every, steps) and bool(module.active.any()):
            fit.validate(module, datamodule=datamodule, verbose=False)  # the steps after the last check
    seconds = time.perf_counter() - start
    taken = [fit.global_step if at is None else at for at in stops.stopped_at]
    last = module.tuned_prompt()
    return [_outcome(stops, k, taken, seconds, used, steps, last[k]) for k in range(size)]


def _outcome(
    stops: StackedStops, k: int, taken: list[int], seconds: float, used: Compute, budget: int, last: torch.Tensor
) -> FitOutcome:
    share = taken[k] / max(sum(taken), 1)
    compute = Compute(int(used.forward * share), int(used.backward * share), used.flops * share)
    score, step, prompt = stops.best[k] or (None, None, last)  # no validation counted: the last prompt
    plateaued = stops.stopped_at[k] is not None and not stops.passed[k] and taken[k] < budget
    return FitOutcome(prompt, taken[k], seconds * share, score, step, stops.passed[k], plateaued, compute)
