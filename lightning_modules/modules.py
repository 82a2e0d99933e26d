"""Lightning modules: rank-classification evaluation and prompt tuning of a frozen model.

``RankClassificationModule`` scores each class's verbalizer as the continuation of
prompt + input and predicts the argmax; it evaluates any fixed prompt (or none: the
zero-shot baseline). ``PromptTuningModule`` adds a trainable prompt and the tuning loss.
Only the prompt is a trainable parameter, so DDP all-reduces only the prompt's gradient,
and checkpoints hold only the prompt.
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from mlflow_recycle.errors import RecycleError
from mlflow_recycle.prompted_lm import PromptedLM

from .data import TextClassificationDataModule

log = logging.getLogger(__name__)
# The frozen model is in eval mode on purpose (no dropout); Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
# Lightning's own use of a deprecated torch API (its utilities/_pytree.py): not the user's to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", module=r"lightning\.")

#: What ``conf/prompt`` instantiates (``_partial_: true``): the optimizer, given the parameters to
#: train, and the learning-rate scheduler, given the optimizer (lightning-hydra-template's shape).
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def adamw(lr: float = 0.01, weight_decay: float = 1e-5) -> OptimizerFactory:
    """AdamW at ``lr``: the default optimizer of a prompt (``conf/prompt/default.yaml``)."""
    return partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


_NOT_HYPERPARAMETERS = (
    "model",
    "prompt",
    "initial_prompt",
    "anchor",
    "teacher",
    "teacher_prompt",
    "student",
    "student_init",
)


class RankClassificationModule(L.LightningModule):
    """Evaluate a prompt (or no prompt) on a frozen model by rank classification.

    After ``trainer.validate`` / ``trainer.test``, ``results[stage]`` holds the accuracy
    and the per-example predictions, deduplicated across DDP ranks (the distributed
    sampler repeats examples to even out the shards) and ordered by example index.

    Args:
        model: a Hugging Face causal or encoder-decoder LM; it is frozen.
        prompt: ``[length, dim]`` prompt, or None for zero-shot; or a stack of K prompts
            ``[K, length, dim]``, scored in one pass: ``results[stage]`` then holds each
            prompt's result under ``prompts`` and its ``accuracy`` and ``macro_f1`` as lists.
        length_normalize: score by mean instead of summed token log-likelihood, so that
            multi-token verbalizers are not penalised for their length.
        name: metric prefix, e.g. ``"source"`` gives ``source/test_accuracy``.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt: torch.Tensor | None = None,
        *,
        length_normalize: bool = False,
        name: str = "eval",
        trainable: bool = False,
    ) -> None:
        super().__init__()
        # Lightning's convention: the constructor's settings (of the subclass too) in self.hparams and
        # checkpoints; models and tensors stay out (checkpoints hold only the prompt, see below).
        self.save_hyperparameters(ignore=list(_NOT_HYPERPARAMETERS))
        self.lm = PromptedLM(model.requires_grad_(False).eval())
        if prompt is not None and prompt.shape[-1] != self.lm.dim:
            raise RecycleError(
                f"Prompt dim {prompt.shape[-1]} does not fit this model (embedding dim {self.lm.dim}): "
                "recycle the prompt to this model first."
            )
        if prompt is None:
            self.prompt = None
        elif trainable:
            self.prompt = nn.Parameter(prompt.detach().clone().float())
        else:
            self.register_buffer("prompt", prompt.detach().clone().float())
        self.length_normalize, self.name = length_normalize, name
        self._outputs: list[torch.Tensor] = []
        self.results: dict[str, dict[str, Any]] = {}

    def train(self, mode: bool = True) -> RankClassificationModule:
        """Keep the frozen model in eval mode (no dropout) whatever Lightning asks."""
        super().train(mode)
        self.lm.model.eval()
        return self

    @property
    def stack(self) -> int | None:
        """How many prompts the module scores at once (None: one prompt, or none)."""
        return int(self.prompt.shape[0]) if self.prompt is not None and self.prompt.dim() == 3 else None

    # ------------------------------------------------------------------ evaluation
    def _class_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm.class_scores(self.prompt, batch, self.length_normalize)  # [B, C] or [K, B, C]

    def _score(self, batch: dict[str, torch.Tensor]) -> None:
        scores = self._class_scores(batch)
        if scores.dim() == 3:
            scores = scores.transpose(0, 1).reshape(scores.shape[1], -1)  # [B, K * C], prompt-major
        rows = torch.cat([batch["index"].unsqueeze(1).float(), batch["labels"].unsqueeze(1).float(), scores.float()], 1)
        self._outputs.append(rows.detach())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch)

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def _gathered(self) -> dict[str, Any] | None:
        """The scored examples so far (all ranks, deduplicated, by example index): accuracy, macro-F1,
        predictions; None when there are none (an empty split on every rank)."""
        if not self._outputs:
            return None
        local = torch.cat(self._outputs)
        self._outputs = []
        gathered = self.all_gather(local)
        rows = gathered.reshape(-1, local.shape[-1]) if self.trainer.world_size > 1 else local
        index = rows[:, 0].long()
        order = torch.argsort(index, stable=True)
        rows, index = rows[order], index[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        rows = rows[first].cpu()
        labels, index = rows[:, 1].long(), index[first].cpu()
        if self.stack is None:
            return _result(index, labels, rows[:, 2:])
        per_prompt = rows[:, 2:].view(len(rows), self.stack, -1).unbind(1)
        results = [_result(index, labels, scores) for scores in per_prompt]
        return {"prompts": results, **{key: [r[key] for r in results] for key in ("accuracy", "macro_f1")}}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any] | None:
        """Score every batch of ``batches`` (a split's whole loader) outside Lightning's loops, as
        ``_gathered`` returns it: what a callback uses to check a prompt on more examples than the
        trainer's ``limit_val_batches`` validates on. Every rank calls it (it gathers)."""
        self._outputs = []
        for batch in batches:
            self._score(self.trainer.strategy.batch_to_device(batch))
        return self._gathered()

    def _finish(self, stage: str) -> None:
        result = self._gathered()
        if result is None:  # an empty split: nothing to score on any rank
            nan = float("nan")
            self.results[stage] = {"accuracy": nan} if self.stack is None else {"accuracy": [nan] * self.stack}
            return
        self.results[stage] = result
        # Every rank holds the same deduplicated value: no further reduction needed. A stack logs its means.
        accuracy, macro_f1 = (
            statistics.fmean(v) if self.stack else v for v in (result["accuracy"], result["macro_f1"])
        )
        self.log(f"{self.name}/{stage}_accuracy", accuracy, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log(f"{self.name}/{stage}_macro_f1", macro_f1, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._finish("validation")

    def on_test_epoch_end(self) -> None:
        self._finish("test")


def _result(index: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> dict[str, Any]:
    """One prompt's scored examples: accuracy, macro-F1, predictions."""
    predictions = scores.argmax(1)
    return {
        "accuracy": float((predictions == labels).float().mean()),
        "macro_f1": macro_f1_of(confusion_counts(labels, predictions, scores.shape[1])),
        "index": index,
        "predictions": predictions,
        "labels": labels,
        "scores": scores,
    }


def confusion_counts(labels: torch.Tensor, predictions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[true class, predicted class]`` counts."""
    counts = torch.zeros(n_classes, n_classes, dtype=torch.long)
    counts.index_put_((labels.long(), predictions.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return counts


def macro_f1_of(confusion: torch.Tensor) -> float:
    """Mean over classes of F1 from ``[true, predicted]`` counts (a class never predicted nor present counts 0)."""
    true_positive = confusion.diagonal().double()
    both = confusion.sum(0).double() + confusion.sum(1).double()
    return float(torch.where(both > 0, 2 * true_positive / both.clamp(min=1), 0.0).mean())


#: How a prompt is tuned: the LM loss on the label's verbalizer, or cross-entropy among the classes.
OBJECTIVES = ("lm", "classes")

#: What a gate, an early stop or a best-prompt choice may watch (``{name}/validation_<metric>``).
METRICS = ("accuracy", "macro_f1")


class TrainablePromptModule(RankClassificationModule):
    """A rank classifier whose prompt is the one trainable parameter: the base of prompt tuning
    and distillation. Validation (when the trainer runs it) scores the current prompt, logged
    as ``{name}/validation_accuracy``, which is what :class:`~lightning_modules.BestPrompt`
    and the gate's early stop watch."""

    def __init__(
        self,
        model: nn.Module,
        initial_prompt: torch.Tensor,
        *,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        length_normalize: bool = False,
        name: str = "tune",
    ) -> None:
        for what, value in (("optimizer", optimizer), ("scheduler", scheduler)):
            if value is not None and not callable(value):
                raise RecycleError(
                    f"prompt.{what} must build a torch {what} (a config with _target_ and _partial_: true), "
                    f"got {value!r}."
                )
        super().__init__(model, initial_prompt, length_normalize=length_normalize, name=name, trainable=True)
        self.optimizer_factory = optimizer or adamw()
        self.scheduler_factory = scheduler
        # Checkpoints hold only the prompt (see on_save_checkpoint), so loading is partial.
        self.strict_loading = False

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([self.prompt])
        if self.scheduler_factory is None:
            return optimizer
        # stepped every optimizer step: schedules here are counted in steps, as trainer.max_steps is
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k == "prompt"}

    def tuned_prompt(self) -> torch.Tensor:
        """The current prompt as a detached float32 CPU tensor (gathered when FSDP shards it)."""
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                return self.prompt.detach().float().cpu().clone()
        return self.prompt.detach().float().cpu().clone()


class PromptTuningModule(TrainablePromptModule):
    """Tune a soft prompt on a frozen model: LM loss on the label's verbalizer.

    Args:
        model: a Hugging Face causal or encoder-decoder LM; it is frozen.
        initial_prompt: ``[length, dim]`` starting point (see ``mlflow_recycle.prompt_init``),
            or a prompt to continue from (a recycled one, when re-tuning on a new base).
        optimizer: builds the optimizer from the parameters (default AdamW, lr 0.01), e.g.
            ``partial(torch.optim.AdamW, lr=0.1)``; ``conf/prompt`` instantiates it.
        scheduler: builds a learning-rate scheduler from the optimizer, stepped every step
            (e.g. ``partial(OneCycleLR, max_lr=0.1, total_steps=400)``), or None: constant lr.
        anchor, gamma: add ``gamma · mean‖pᵢ − anchorᵢ‖²`` to the loss, keeping the prompt
            near the anchor rows (see ``mlflow_recycle.prompt_init.regularization_anchor``).
        objective: ``lm``, the LM loss on the label's verbalizer (the paper's); ``classes``,
            cross-entropy among the classes' scores, what rank classification decides by (a
            :class:`TextClassificationDataModule` given to ``fit`` is set to build its training
            batches for it).
    """

    def __init__(
        self,
        model: nn.Module,
        initial_prompt: torch.Tensor,
        *,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        length_normalize: bool = False,
        name: str = "tune",
        anchor: torch.Tensor | None = None,
        gamma: float = 0.0,
        objective: str = "lm",
    ) -> None:
        if objective not in OBJECTIVES:
            raise RecycleError(f"Unknown tuning objective {objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        super().__init__(
            model,
            initial_prompt,
            optimizer=optimizer,
            scheduler=scheduler,
            length_normalize=length_normalize,
            name=name,
        )
        self.objective = objective
        self.gamma = gamma if anchor is not None else 0.0
        if anchor is not None:
            self.register_buffer("anchor", anchor.detach().clone().float())

    def setup(self, stage: str) -> None:
        """The objective decides what a training batch holds: a task data module is told so."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and isinstance(datamodule, TextClassificationDataModule):
            datamodule.train_batch = self.objective

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        if ("class_targets" in batch) != (self.objective == "classes"):
            wanted = "every class's scoring rows" if self.objective == "classes" else "LM rows (context + verbalizer)"
            raise RecycleError(
                f"The {self.objective!r} objective trains on {wanted}, which this batch does not hold: build the data "
                f"module with train_batch={self.objective!r} (both follow prompt.objective)."
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        if self.objective == "classes":
            loss = self.lm.class_loss(self.prompt, batch, self.length_normalize)
        else:
            loss = self.lm.loss(self.prompt, batch)
        self.log(f"{self.name}/train_loss", loss, prog_bar=True)
        if self.gamma:
            penalty = ((self.prompt - self.anchor) ** 2).sum(-1).mean()
            self.log(f"{self.name}/penalty", penalty)
            loss = loss + self.gamma * penalty
        return loss
