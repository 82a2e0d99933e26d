"""Refining a recycled prompt on the target model without labels.

A recycler maps the prompt from the vocabulary alone; refinement then spends a few
hundred steps of target-model compute to make the target, with the recycled prompt,
classify unlabelled task inputs the way the source did with the original prompt
(teacher-student distillation, :mod:`lightning_modules.distillation`). It needs the
task's inputs (its ``train`` split, labels dropped) but no labels, and it never trains
either model. Enabled by a recycler config's ``refine`` block (``conf/recycler/distill.yaml``).

:func:`distill_map` trains the recycler's map instead, on the behaviour of several prompts of
one task at once (a recycler config's ``train_map`` block, ``conf/recycler/linear_behaviour.yaml``):
paid once per model pair and task, after which each prompt of that task costs a transform.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules import (
    FitOutcome,
    MapDistillationModule,
    MapFitOutcome,
    PromptDistillationModule,
    TextClassificationDataModule,
    TrainerFactory,
    UnlabelledPairDataModule,
    adamw,
    fit_map,
    fit_prompt,
    long_enough,
    read_examples,
)

from .errors import RecycleError
from .models import LoadedModel
from .prompt import SoftPrompt
from .prompted_lm import TaskEncoder
from .recyclers import Recycler

log = logging.getLogger(__name__)

METHODS = ("distill",)


@dataclass(frozen=True)
class DistillSettings:
    """How long and on what the student prompt is refined.

    Args:
        steps: optimizer steps (the prototype: 100 reached most of the re-tuned accuracy).
        texts: unlabelled inputs drawn (seeded) from the task's ``split``.
        batch_size, lr, temperature: training settings.
    """

    method: str = "distill"
    steps: int = 100
    texts: int = 4000
    split: str = "train"
    batch_size: int = 32
    lr: float = 0.01
    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> DistillSettings:
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        if values.get("method", "distill") not in METHODS:
            raise RecycleError(f"Unknown refine method {values.get('method')!r}; choose one of {', '.join(METHODS)}.")
        try:
            return cls(**values)
        except TypeError as exc:
            raise RecycleError(f"Bad refine settings {values}: {exc}.") from exc


def unlabelled_texts(prompt: SoftPrompt, split: str, limit: int, seed: int) -> list[str]:
    """Inputs of the prompt's task, labels dropped."""
    task = prompt.task
    if task is None or not task.data:
        raise RecycleError(
            "Refinement and maps trained on behaviour need unlabelled inputs of the prompt's task, but the prompt "
            "records no task data: log prompts with their TaskSpec (data=...) or use a recycler without refine "
            "or train_map."
        )
    examples = read_examples(task, split)
    texts = [text for text, _ in (long_enough(task, split, examples, "train") if split == "train" else examples)]
    return random.Random(seed).sample(texts, limit) if limit < len(texts) else texts


def pair_data(
    source: LoadedModel, target: LoadedModel, prompt: SoftPrompt, settings: DistillSettings, seed: int, *, purpose: str
) -> UnlabelledPairDataModule:
    """The task's unlabelled inputs of ``settings.split``, tokenised for ``source`` (teacher) and ``target``."""
    task = prompt.task
    texts = unlabelled_texts(prompt, settings.split, settings.texts, seed)
    if not texts:
        raise RecycleError(f"The {settings.split!r} split of {task.data} has no inputs to {purpose}.")
    return UnlabelledPairDataModule(
        texts,
        TaskEncoder(source.tokenizer, task, seq2seq=source.seq2seq),
        TaskEncoder(target.tokenizer, task, seq2seq=target.seq2seq),
        batch_size=min(settings.batch_size, len(texts)),  # batches are full-size only: a small task still trains
        seed=seed,
    )


def distill(
    source: LoadedModel,
    prompt: SoftPrompt,
    target: LoadedModel,
    start: torch.Tensor,
    settings: DistillSettings,
    trainer: TrainerFactory,
    *,
    seed: int = 0,
    validation: TextClassificationDataModule | None = None,
    eval_every: int | None = None,
    stop_above: float | None = None,
    patience: int | None = None,
    start_score: float | None = None,
    metric: str = "accuracy",
) -> FitOutcome:
    """A prompt on ``target``, trained from ``start`` to agree with ``source`` + ``prompt`` on unlabelled inputs.

    With ``validation`` (the target's labelled validation data) and ``eval_every``, the
    student is validated every that many steps, the best one is kept, and with
    ``stop_above`` training ends as soon as its ``metric`` beats it (the gate); with ``patience``
    also after that many validations without improving on ``start_score`` (the starting
    prompt's) or the best since. Labels only
    judge; the training signal is the teacher's.
    """
    task = prompt.task
    data = pair_data(source, target, prompt, settings, seed, purpose="refine on")
    module = PromptDistillationModule(
        source.model,
        prompt.embeddings,
        target.model,
        start,
        temperature=settings.temperature,
        optimizer=adamw(settings.lr),
        length_normalize=task.length_normalize,
    )
    log.info(
        "Refining the prompt on %s: up to %d distillation steps on %d unlabelled inputs",
        target.name,
        settings.steps,
        len(data.texts),
    )
    L.seed_everything(seed, verbose=False)
    return fit_prompt(
        module,
        trainer,
        steps=settings.steps,
        eval_every=eval_every if validation is not None else None,
        stop_above_score=stop_above,
        patience=patience,
        start_score=start_score,
        metric=metric,
        train_dataloaders=data.train_dataloader(),
        val_dataloaders=validation.val_dataloader() if validation is not None else None,
    )


def distill_map(
    source: LoadedModel,
    prompts: Sequence[SoftPrompt],
    target: LoadedModel,
    recycler: Recycler,
    settings: DistillSettings,
    trainer: TrainerFactory,
    *,
    seed: int = 0,
) -> tuple[Recycler, MapFitOutcome]:
    """A copy of the fitted ``recycler`` whose map is trained, label-free, so that ``target`` reading
    each mapped prompt classifies the task's unlabelled inputs as ``source`` does reading the prompt.

    ``prompts`` are prompts of one task on ``source`` (a migration's of that task); the map then
    recycles every prompt of the task, those it never saw included (docs/benchmarks.md, section 6).
    The trained copy records how it was trained in its config (``behaviour``), hence in the
    lineage of every prompt it recycles.
    """
    if not prompts:
        raise RecycleError("Training a map on behaviour needs at least one prompt of the task.")
    task = prompts[0].task
    if any(prompt.task != task for prompt in prompts):
        raise RecycleError("A map is trained on the prompts of one task: group the prompts by task first.")
    data = pair_data(source, target, prompts[0], settings, seed, purpose="train the map on")
    trained = copy.deepcopy(recycler)  # the fitted map stays as it is, for other tasks
    module = MapDistillationModule(
        source.model,
        [prompt.embeddings for prompt in prompts],
        target.model,
        trained,
        temperature=settings.temperature,
        optimizer=adamw(settings.lr, weight_decay=0.0),
        length_normalize=task.length_normalize,
    )
    log.info(
        "Training the %s map %s -> %s on the behaviour of %d %s prompts: %d steps on %d unlabelled inputs",
        recycler.name, source.name, target.name, len(prompts), task.name, settings.steps, len(data.texts),
    )  # fmt: skip
    L.seed_everything(seed, verbose=False)
    outcome = fit_map(module, trainer, steps=settings.steps, train_dataloaders=data.train_dataloader())
    trained.load_trained(outcome.state, {**asdict(settings), "prompts": len(prompts), "task": task.name})
    return trained, outcome


def refined(recycled: SoftPrompt, outcome: FitOutcome, settings: DistillSettings) -> SoftPrompt:
    """``recycled`` with the refined tensor and the refinement in its lineage."""
    return recycled.replace(
        embeddings=outcome.prompt,
        recycler=f"{recycled.recycler}+{settings.method}",
        recycler_config={**recycled.recycler_config, "refine": asdict(settings)},
    )


def refine_settings(recycler_cfg: DictConfig) -> DistillSettings | None:
    """The ``refine`` block of a recycler config, when it has one."""
    block = recycler_cfg.get("refine")
    return DistillSettings.from_config(block) if block else None


__all__ = ["DistillSettings", "distill", "distill_map", "refine_settings", "refined", "unlabelled_texts"]
