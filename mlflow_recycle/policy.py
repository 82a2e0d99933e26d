"""The migration policy: recycle, gate on validation, refine without labels, re-tune from the recycled start.

A policy is an ordered list of stages, each with its budget, and a :class:`Gate`. A prompt
goes through the stages until one produces a prompt that passes the gate on the target's
validation split; each stage starts from the best prompt so far:

- ``recycle``: recyclers tried in order (training-free maps, each fitted once per model
  pair by the caller's ``fit`` and reused), e.g. ``identity`` when the new version kept its
  embedding space, then ``linear``; or a map trained, label-free, on the behaviour of the
  transfer's prompts of the task (``train_map``), once per pair and task.
- ``refine``: label-free teacher–student refinement (:func:`mlflow_recycle.refine.distill`),
  validated every ``eval_every`` steps, stopping as soon as the gate passes.
- ``retune``: supervised tuning on the target from the best prompt so far (a warm start),
  the same early stop; only when the prompt's task data with labels can be read, otherwise
  skipped with the reason recorded.

Decisions look at validation only; the caller measures and reports test accuracy.
Everything here is orchestration over the pure core and Lightning: no MLflow.
``conf/policy/`` holds the configs; :func:`run_policy` runs one prompt through one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules import FitOutcome, PromptTuningModule, TrainerFactory, fit_prompt, read_examples
from lightning_modules.modules import OBJECTIVES

from .anchors import DEFAULT_OFFSET, DEFAULT_SIZE, embedding_table
from .compute import Compute, metered
from .config import instantiate_partial
from .errors import RecycleError
from .evaluation import Baselines, Evaluator, Gate, task_data
from .models import LoadedModel
from .prompt import SoftPrompt
from .prompt_init import INIT_METHODS, initial_prompt
from .recycle import fit_recycler
from .recyclers import Recycler, available_recyclers, get_recycler, recycler_class
from .refine import DistillSettings, distill, distill_map, refined

log = logging.getLogger(__name__)

STAGES = ("recycle", "refine", "retune")
STARTS = ("best", "best_or_init")  # of a retune stage
CONDITIONS = ("same_space", "enough_prompts", "enough_failing")  # of a recycler
REFINE_CONDITIONS = ("teacher_passes",)
PASSED, FAILED, SKIPPED, UNEVALUATED = "passed", "failed", "skipped", "unevaluated"


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RecyclerChoice:
    """One recycler of a ``recycle`` stage.

    Args:
        name, options: the recycler (``conf/recycler/<name>.yaml`` shape).
        refine: a fixed refinement that is part of the method (``conf/recycler/distill.yaml``).
        train_map: train the fitted map itself on the behaviour of the transfer's prompts of
            the prompt's task (:func:`~mlflow_recycle.refine.distill_map`,
            ``conf/recycler/linear_behaviour.yaml``): once per model pair and task, its cost
            recorded as the map's (:attr:`PolicyOutcome.map_flops`), not the prompt's.
        when: ``same_space``: only try it when both models share the tokenizer and dim and
            their anchor embeddings have a mean cosine similarity of at least ``min_cosine``
            (``identity`` for an update that kept its embedding space); ``enough_prompts``: only
            when the transfer migrates at least ``min_prompts`` prompts of the prompt's task;
            ``enough_failing``: only when at least ``min_prompts`` of them (this one included) fail
            the gate with every map the stage tried before this one (those checks made ahead for
            the others, once: a map trained on behaviour costs about a fifth of a re-tuning, worth
            it only where several prompts need it).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    refine: DistillSettings | None = None
    when: str | None = None
    min_cosine: float = 0.9
    train_map: DistillSettings | None = None
    min_prompts: int = 1

    @property
    def label(self) -> str:
        """``linear``, ``linear+distill(100)``, ``linear+map(600)``: what the method is, for runs and tags."""
        trained = f"+map({self.train_map.steps})" if self.train_map else ""
        return self.name + trained + (f"+{self.refine.method}({self.refine.steps})" if self.refine else "")

    @property
    def map_key(self) -> str:
        """What determines the map fitted on anchors (name and options; not the refinement, nor the
        training on behaviour): one fit per key."""
        return json.dumps({"name": self.name, "options": dict(self.options)}, sort_keys=True)

    @property
    def needs_prompts(self) -> bool:
        """Whether trying it needs the transfer's prompts of the task (to train on, or to count)."""
        return self.train_map is not None or self.when in ("enough_prompts", "enough_failing")

    @property
    def trained_key(self) -> str:
        """What determines a map trained on behaviour, besides the task and its prompts."""
        return json.dumps({"map": self.map_key, "train_map": asdict(self.train_map or DistillSettings())})

    @property
    def key(self) -> str:
        """What determines the choice's prompt for a given prompt of the transfer: the map and the refinement."""
        return json.dumps({"trained": self.trained_key, "refine": asdict(self.refine) if self.refine else None})


@dataclass(frozen=True)
class RecycleStage:
    recyclers: tuple[RecyclerChoice, ...]
    name: str = "recycle"


@dataclass(frozen=True)
class RefineStage:
    """Label-free refinement; ``when: teacher_passes`` runs it only when the teacher (the source
    prompt on its own model) beats the target's gate on the same validation examples: a
    student that matches a teacher under the gate does not pass it, so the budget goes to the
    next stage instead. ``patience``: stop after that many validations in a row that do not
    improve on the starting prompt's gate score (or the best since); None: the whole budget.
    ``train_like_validation``: refine on the inputs the gate's validation rule would keep
    (the task's ``validation_min_words`` applied to its train split too). ``skip``: turned off
    (``policy.stages.1.skip=true``), recorded as skipped with that reason."""

    settings: DistillSettings
    eval_every: int = 25
    when: str | None = None
    patience: int | None = None
    train_like_validation: bool = False
    skip: bool = False
    name: str = "refine"


@dataclass(frozen=True)
class RetuneStage:
    """Supervised tuning from the best prompt so far; ``optimizer`` is a ``_target_`` config
    (``conf/policy/default.yaml`` points it at ``prompt.optimizer``: the target's recipe), or
    None: the tuning module's default (``lightning_modules.adamw()``). ``objective``: ``lm`` or
    ``classes`` (:class:`~lightning_modules.PromptTuningModule`). ``train_like_validation``:
    tune on the train examples the gate's validation rule would keep (as :class:`RefineStage`).
    ``start``: ``best``, the best prompt so far (a warm start); ``best_or_init``, the same unless
    it reads under the target's random-token prompt on the gate split (the map lost the task and
    more), then a fresh prompt initialised on the target as the source prompt was (its ``init``,
    the transfer's seed): decided on baselines the gate measured anyway, at no cost.
    ``skip``: turned off, as :class:`RefineStage`'s. With the gate's ``screen``, each check
    (every ``eval_every`` steps) reads the screen and the whole split only when the screen reads
    above the gate (:class:`~lightning_modules.ScreenedGate`)."""

    steps: int = 300
    eval_every: int = 50
    optimizer: Mapping[str, Any] | None = None
    objective: str = "lm"
    batch_size: int = 32
    limit_train: int | None = None
    train_like_validation: bool = False
    start: str = "best"
    skip: bool = False
    name: str = "retune"


Stage = RecycleStage | RefineStage | RetuneStage


@dataclass(frozen=True)
class Policy:
    """The gate and the ordered stages (``conf/policy/*.yaml``)."""

    gate: Gate
    stages: tuple[Stage, ...]

    @property
    def label(self) -> str:
        parts = []
        for stage in self.stages:
            if isinstance(stage, RecycleStage):
                parts.append("/".join(choice.label for choice in stage.recyclers))
            elif stage.skip:
                continue
            elif isinstance(stage, RefineStage):
                parts.append(f"refine({stage.settings.steps})")
            else:
                parts.append(f"retune({stage.steps})")
        return " > ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Everything that decides the outcome (for migration keys and run params)."""
        return {"gate": asdict(self.gate), "stages": [asdict(stage) for stage in self.stages]}

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Policy:
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        try:
            gate = Gate(**(values.get("gate") or {}))
        except TypeError as exc:
            raise RecycleError(
                f"Bad policy.gate {values.get('gate')}: {exc} "
                "(keys: split, margin, margin_se, keep_gain, metric, screen)."
            ) from exc
        stages = [_stage(dict(stage), i) for i, stage in enumerate(values.get("stages") or [])]
        if not stages or not isinstance(stages[0], RecycleStage):
            raise RecycleError("A policy starts with a `recycle` stage (policy.stages[0].stage=recycle).")
        return cls(gate, tuple(stages))


def _condition(when: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    """A ``when:`` setting of a recycler or stage: null or one of ``allowed``."""
    if when is not None and when not in allowed:
        raise RecycleError(f"Unknown {what} condition when={when!r}; choose one of {', '.join(allowed)} or null.")
    return when


def _choice(entry: Mapping[str, Any]) -> RecyclerChoice:
    entry = dict(entry)
    refine, train_map = entry.pop("refine", None), entry.pop("train_map", None)
    when = _condition(entry.pop("when", None), CONDITIONS, "recycler")
    if "name" not in entry:
        raise RecycleError(f"A recycler of policy.stages[].recyclers needs a name, got {entry}.")
    if train_map and not recycler_class(entry["name"]).trainable:
        trainable = [name for name in available_recyclers() if recycler_class(name).trainable]
        raise RecycleError(
            f"The {entry['name']!r} recycler's map cannot be trained on behaviour: remove its train_map block, "
            f"or use one of {', '.join(trainable)} (recycler=linear_behaviour)."
        )
    min_prompts = entry.get("min_prompts", 1)
    if isinstance(min_prompts, bool) or not isinstance(min_prompts, int) or min_prompts < 1:
        raise RecycleError(
            f"Bad min_prompts={min_prompts!r} for recycler {entry['name']!r}: a number of prompts, 1 or more."
        )
    return RecyclerChoice(
        name=entry["name"],
        options=entry.get("options") or {},
        refine=DistillSettings.from_config(refine) if refine else None,
        when=when,
        min_cosine=entry.get("min_cosine", 0.9),
        train_map=DistillSettings.from_config(train_map) if train_map else None,
        min_prompts=min_prompts,
    )


def _positive(kind: str, index: int, entry: Mapping[str, Any], *keys: str) -> None:
    """Refuse a count setting that is not a positive integer (null allowed where the stage has a default)."""
    for key in keys:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RecycleError(
                f"Bad settings for policy stage {kind!r}: {key}={value!r}; set policy.stages.{index}.{key} "
                "to a positive number of steps or validations" + (", or null" if key == "patience" else "") + "."
            )


def _stage(entry: dict[str, Any], index: int) -> Stage:
    kind = entry.pop("stage", None)
    if kind not in STAGES:
        raise RecycleError(f"Unknown policy stage {kind!r}; each of policy.stages needs stage: one of {STAGES}.")
    try:
        if kind == "recycle":
            return RecycleStage(tuple(_choice(c) for c in entry.get("recyclers") or ()))
        _positive(kind, index, entry, "steps", "eval_every", *(("patience",) if kind == "refine" else ()))
        if kind == "refine":
            eval_every = entry.pop("eval_every", 25)
            patience = entry.pop("patience", None)
            like = bool(entry.pop("train_like_validation", False))
            skip = bool(entry.pop("skip", False))
            when = _condition(entry.pop("when", None), REFINE_CONDITIONS, "refine")
            settings = DistillSettings.from_config(entry)
            return RefineStage(settings, eval_every, when, patience, train_like_validation=like, skip=skip)
        for key, allowed in (("objective", OBJECTIVES), ("start", STARTS)):
            if key in entry and entry[key] not in allowed:
                raise RecycleError(
                    f"Bad settings for policy stage 'retune': {key}={entry[key]!r}; set "
                    f"policy.stages.{index}.{key} to one of {', '.join(allowed)}."
                )
        return RetuneStage(**entry)
    except TypeError as exc:
        raise RecycleError(f"Bad settings for policy stage {kind!r}: {exc}.") from exc


# ---------------------------------------------------------------------- outcome
@dataclass
class StageRecord:
    """What one stage did: its status, the gate value after it, and what it cost."""

    stage: str
    status: str  # passed | failed | skipped | unevaluated
    method: str = ""
    score: float | None = None  # gate-split accuracy of the best prompt after the stage (a screen's, when
    # the gate's screen turned every prompt so far away: policy.gate.screen)
    steps: int = 0
    seconds: float = 0.0
    flops: float = 0.0  # model compute (mlflow_recycle.compute), its gate evaluations included
    reason: str = ""
    tried: dict[str, float] = field(default_factory=dict)  # recycle: each recycler's gate-split accuracy


@dataclass
class PolicyOutcome:
    """The migrated prompt and how it got there."""

    prompt: SoftPrompt
    gate: str  # passed | failed | unevaluated
    score: float | None  # the prompt's accuracy on the gate split
    threshold: float | None
    baselines: Baselines | None
    records: list[StageRecord]
    reason: str = ""
    source_score: float | None = None  # the source prompt on its own model, on the gate split (when measured)
    # Measuring the gate (the target's baselines on the gate's draw; the source's with keep_gain): paid by
    # the first prompt of a transfer to need that draw, shared by the rest (0 for them); not in `flops`.
    gate_flops: float = 0.0
    # Fitting the recycle stage's maps (on anchors; on behaviour with train_map), and the checks of the
    # transfer's other prompts that decide whether to train one (enough_failing; kept, so their prompts do
    # not pay for them again): paid by the first prompt of a transfer (and task) to need them, shared by
    # the rest (0 for them); not in `flops`/`seconds`.
    map_flops: float = 0.0
    map_seconds: float = 0.0

    @property
    def stage(self) -> str | None:
        """The stage whose prompt passed the gate (None when none did)."""
        return next((r.stage for r in self.records if r.status == PASSED), None)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.records)

    def metrics(self) -> dict[str, float]:
        """Per stage and in total: steps, seconds, the gate value after it; and the threshold."""
        metrics: dict[str, float] = {
            "policy/steps": self.steps,
            "policy/seconds": self.seconds,
            "policy/flops": self.flops,
        }
        if self.threshold is not None:
            metrics["policy/gate_threshold"] = self.threshold
        if self.source_score is not None:
            metrics["policy/source_gate_accuracy"] = self.source_score
        metrics["policy/gate_flops"] = self.gate_flops
        metrics["policy/map_flops"] = self.map_flops
        metrics["policy/map_seconds"] = self.map_seconds
        for record in self.records:
            prefix = f"policy/{record.stage}"
            metrics[f"{prefix}/steps"] = record.steps
            metrics[f"{prefix}/seconds"] = record.seconds
            metrics[f"{prefix}/flops"] = record.flops
            if record.score is not None:
                metrics[f"{prefix}/gate_accuracy"] = record.score
            for method, score in record.tried.items():  # "linear+distill(100)" -> "linear_distill_100"
                metrics[f"{prefix}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', method).strip('_')}_gate_accuracy"] = score
        return metrics

    def summary(self) -> str:
        """One line: the verdict and each stage's status, value and cost."""
        parts = []
        for r in self.records:
            value = f" {r.score:.3f}" if r.score is not None else ""
            why = f" ({r.reason})" if r.reason else ""
            cost = f"{r.steps} steps, {r.seconds:.1f} s, {r.flops:.2g} FLOPs"
            name = f"{r.stage}[{r.method}]" if r.method else r.stage
            parts.append(f"{name} {r.status}{value}, {cost}{why}")
        threshold = f" > {self.threshold:.3f}" if self.threshold is not None else ""
        maps = f"; the maps: {self.map_seconds:.1f} s, {self.map_flops:.2g} FLOPs" if self.map_flops else ""
        return f"gate {self.gate}{threshold}: " + "; ".join(parts) + maps


# ---------------------------------------------------------------------- running
@dataclass
class Transfer:
    """One source → target model pair, with what the stages need to run on it.

    Args:
        source, target: the two loaded models.
        trainer: builds Lightning trainers (``instantiate(cfg.trainer, _partial_=True)``).
        fit: the map of a :class:`RecyclerChoice`: fitted on anchors, or with ``train_map``
            trained on the behaviour of the prompts given (:meth:`peers`); the caller fits once
            per pair, trains once per pair and task, and may reuse one logged earlier (:func:`fitter`).
        prompts: the prompts this transfer migrates (a migration's, a benchmark pair's): maps
            trained on behaviour learn from those of a prompt's task, ``when: enough_prompts``
            and ``enough_failing`` count them.
        limit_val, eval_batch_size, random_draws, seed: evaluation settings.
    """

    source: LoadedModel
    target: LoadedModel
    trainer: TrainerFactory
    fit: Callable[[RecyclerChoice, Sequence[SoftPrompt] | None], Recycler]
    limit_val: int | None = 500
    eval_batch_size: int = 64
    random_draws: int = 3
    seed: int = 0
    prompts: Sequence[SoftPrompt] = ()
    _baselines: dict[tuple[Any, ...], Baselines] = field(default_factory=dict, repr=False)
    _judges: dict[tuple[Any, ...], _Judge] = field(default_factory=dict, repr=False)
    _trained: set[tuple[str, Any]] = field(default_factory=set, repr=False)  # (trained_key, task) of maps trained

    def peers(self, prompt: SoftPrompt) -> list[SoftPrompt]:
        """The transfer's prompts of ``prompt``'s task, ``prompt`` among them (added when it is not)."""
        same = [p for p in self.prompts if p.task == prompt.task]
        if not any(p.length == prompt.length and torch.equal(p.embeddings, prompt.embeddings) for p in same):
            same.append(prompt)
        return same

    def recycler(self, choice: RecyclerChoice, prompts: Sequence[SoftPrompt] | None = None) -> Recycler:
        """:attr:`fit`'s map for ``choice`` (trained on ``prompts`` with ``train_map``), noting which are trained."""
        recycler = self.fit(choice, prompts)
        if choice.train_map is not None and prompts:
            self._trained.add((choice.trained_key, prompts[0].task))
        return recycler

    def trained(self, choice: RecyclerChoice, task: Any) -> bool:
        """Whether ``choice``'s map was trained on ``task``'s prompts here (using it costs a transform and a check)."""
        return (choice.trained_key, task) in self._trained

    def judge(self, gate: Gate, prompt: SoftPrompt, problem: str | None) -> _Judge:
        """The gate for ``prompt`` (``problem``: why it cannot be judged, or None), built once per prompt, gate
        and evaluation draw."""
        key = (prompt.digest, gate, problem, self.seed, self.limit_val, self.eval_batch_size, self.random_draws)
        if key not in self._judges:
            self._judges[key] = _Judge(gate, self, prompt, problem)
        return self._judges[key]

    def evaluator(self, split: str, metric: str = "accuracy") -> Evaluator:
        return Evaluator(self.trainer, (split,), self.random_draws, self.seed, metric)

    def screen_batches(self, screen: int | None) -> int | None:
        """Whole evaluation batches holding ``screen`` examples (None: no screen)."""
        return None if not screen else math.ceil(screen / self.eval_batch_size)

    def data(self, side: LoadedModel, prompt: SoftPrompt, screen: int | None = None, **limits: Any):
        """The task on ``side`` with the gate's draw of validation; with a ``screen``, its first
        whole batches a seeded random draw of it (:class:`~lightning_modules.data.ByLength`)."""
        batches = self.screen_batches(screen)
        return task_data(
            side,
            prompt.task,
            prompt_length=prompt.length,
            eval_batch_size=self.eval_batch_size,
            limit_val=self.limit_val,
            seed=self.seed,
            screen=0 if batches is None else batches * self.eval_batch_size,
            **limits,
        )

    def baselines(self, side: LoadedModel, prompt: SoftPrompt, split: str, data, metric: str = "accuracy") -> Baselines:
        """Zero-shot and random-prompt ``metric`` of ``side`` on ``data``'s draw of ``split``, measured once per
        task, prompt length, metric and draw (the data's seed and limit: a prompt is judged on the examples its
        baselines were measured on) and random-prompt seed."""
        draw = (data.seed, data.limits[split])
        key = (side.uri, prompt.task, prompt.length, split, metric, draw, self.seed, self.random_draws)
        if key not in self._baselines:
            self._baselines[key] = self.evaluator(split, metric).baselines(side, data, prompt.length)
        return self._baselines[key]

    def same_space(self, min_cosine: float) -> tuple[bool, str]:
        """Whether the target kept the source's embedding space (same tokenizer and dim, close rows)."""
        if self.source.fingerprint != self.target.fingerprint:
            return False, "the tokenizers differ"
        source, target = embedding_table(self.source.model), embedding_table(self.target.model)
        if source.shape != target.shape:
            return False, f"the embedding tables differ in shape ({tuple(source.shape)} vs {tuple(target.shape)})"
        cosine = float(torch.nn.functional.cosine_similarity(source.float(), target.float(), dim=1).mean())
        if cosine < min_cosine:
            return False, f"mean embedding cosine {cosine:.3f} < min_cosine {min_cosine}"
        return True, f"mean embedding cosine {cosine:.3f}"


def fit_choice(
    choice: RecyclerChoice,
    source: LoadedModel,
    target: LoadedModel,
    *,
    anchor_offset: int = DEFAULT_OFFSET,
    anchor_size: int = DEFAULT_SIZE,
) -> Recycler:
    """``choice``'s recycler fitted on the pair's anchors: its map before any training on behaviour."""
    return fit_recycler(
        get_recycler(choice.name, **choice.options), source.model, source.tokenizer, target.model, target.tokenizer,
        anchor_offset=anchor_offset, anchor_size=anchor_size,
    )  # fmt: skip


def fitter(
    source: LoadedModel,
    target: LoadedModel,
    *,
    anchor_offset: int = DEFAULT_OFFSET,
    anchor_size: int = DEFAULT_SIZE,
    on_fit: Callable[[Recycler, float], None] | None = None,
    trainer: TrainerFactory | None = None,
    seed: int = 0,
) -> Callable[[RecyclerChoice, Sequence[SoftPrompt] | None], Recycler]:
    """A :attr:`Transfer.fit` that fits each distinct recycler (name and options) once on this pair
    and, given prompts for a choice with ``train_map``, trains that map on their behaviour once per
    task (with ``trainer``, seeded with ``seed``), calling ``on_fit(recycler, seconds)`` after each
    fit and training."""
    fitted: dict[Any, Recycler] = {}

    def fit(choice: RecyclerChoice, prompts: Sequence[SoftPrompt] | None = None) -> Recycler:
        if choice.map_key not in fitted:
            start = time.perf_counter()
            fitted[choice.map_key] = fit_choice(
                choice, source, target, anchor_offset=anchor_offset, anchor_size=anchor_size
            )
            if on_fit is not None:
                on_fit(fitted[choice.map_key], time.perf_counter() - start)
        if choice.train_map is None or not prompts:
            return fitted[choice.map_key]
        key = (choice.trained_key, prompts[0].task)
        if key not in fitted:
            if trainer is None:
                raise RecycleError(f"{choice.label} trains its map: give the fitter a trainer.")
            start = time.perf_counter()
            fitted[key], _ = distill_map(
                source, prompts, target, fitted[choice.map_key], choice.train_map, trainer, seed=seed
            )
            if on_fit is not None:
                on_fit(fitted[key], time.perf_counter() - start)
        return fitted[key]

    return fit


def labelled_data_problem(prompt: SoftPrompt, split: str) -> str | None:
    """Why ``split`` of the prompt's task cannot be read with labels (None when it can)."""
    task = prompt.task
    if task is None or not task.data:
        return "the prompt records no task data"
    looks_local = task.data.startswith(("/", ".", "~")) or "/" not in task.data  # hub names are owner/name
    if looks_local and not Path(task.data).expanduser().exists():
        return f"its task data {task.data!r} is not reachable"
    try:
        read_examples(task, split)
    except (RecycleError, OSError, ValueError) as exc:
        return f"its task data {task.data!r} has no usable {split!r} split ({exc})"
    return None


def _trained_like_validation(prompt: SoftPrompt, stage: RefineStage | RetuneStage) -> SoftPrompt:
    """``prompt`` whose task trains on what its validation rule keeps, when the stage asks for it."""
    if not stage.train_like_validation or prompt.task is None:
        return prompt
    return prompt.replace(task=prompt.task.replace(train_min_words=prompt.task.validation_min_words))


def _on_target(prompt: SoftPrompt, target: LoadedModel) -> SoftPrompt:
    return prompt.replace(base_model=target.name, base_model_uri=target.uri, base_model_version=None)


def run_policy(
    policy: Policy, transfer: Transfer, prompt: SoftPrompt, recycled_from: str | None = None, *, judge: bool = True
) -> PolicyOutcome:
    """Migrate ``prompt`` (on ``transfer.source``) to ``transfer.target`` under ``policy``.

    ``judge=False`` (evaluation off): the first applicable recycler's prompt, unevaluated.
    Each stage's record says its steps, seconds and model compute (FLOPs, its gate evaluations included).
    """
    with metered() as used:
        return _run_policy(policy, transfer, prompt, recycled_from, judge, used)


@dataclass
class _Check:
    """A recycler's candidate for one prompt and its gate check."""

    candidate: SoftPrompt
    value: float
    whole: bool  # the whole split's value (False: a gate screen's, which turned it away)
    steps: int


class _Judge:
    """The gate for one prompt of a transfer: the target's data on the gate split's draw, its
    baselines, the threshold, and the recycle stage's checks of the prompt (kept, so that a check
    made ahead for a peer, ``when: enough_failing``, is not made twice). Built once per prompt and
    gate (:meth:`Transfer.judge`); what building it cost (measuring the gate) is :attr:`gate_flops`."""

    def __init__(self, gate: Gate, transfer: Transfer, prompt: SoftPrompt, problem: str | None) -> None:
        self.gate, self.transfer, self.prompt, self.problem = gate, transfer, prompt, problem
        self.data = self.threshold = self.baselines = None
        self.description = ""
        self.checks: dict[str, _Check] = {}  # by RecyclerChoice.key
        self._source: dict[str, Any] = {}  # the source's data on the gate split's draw, the source prompt's score
        with metered() as used:
            if problem is None:
                target = transfer.target
                self.data = transfer.data(target, prompt, gate.screen)
                self.baselines = transfer.baselines(target, prompt, gate.split, self.data, gate.metric)
                source_gain = None
                if gate.keep_gain is not None:
                    side = transfer.source
                    source_baselines = transfer.baselines(side, prompt, gate.split, self.source_data(), gate.metric)
                    source_gain = max(0.0, self.source_score() - source_baselines.best(gate.split))
                self.threshold = gate.threshold(self.baselines, source_gain)
                self.description = gate.describe(self.baselines, source_gain)
        self.gate_flops = used.flops

    def source_data(self):
        if "data" not in self._source:
            self._source["data"] = self.transfer.data(self.transfer.source, self.prompt)
        return self._source["data"]

    def source_score(self) -> float:
        """The source prompt on its own model, on the gate split's draw (measured once)."""
        if "score" not in self._source:
            evaluator = self.transfer.evaluator(self.gate.split, self.gate.metric)
            scores = evaluator.score(self.transfer.source, self.source_data(), self.prompt.embeddings, "source")
            self._source["score"] = scores[self.gate.split]
        return self._source["score"]

    @property
    def measured_source_score(self) -> float | None:
        """:meth:`source_score` when something needed it (None otherwise: it was not measured)."""
        return self._source.get("score")

    def score(self, candidate: SoftPrompt, name: str, limit_batches: int | None = None) -> float:
        evaluator = self.transfer.evaluator(self.gate.split, self.gate.metric)
        target = self.transfer.target
        return evaluator.score(target, self.data, candidate.embeddings, name, limit_batches)[self.gate.split]

    def check(self, candidate: SoftPrompt, name: str) -> tuple[float, bool]:
        """The gate's check: the candidate's score and whether it is the whole split's (with a
        screen, the screen's when it does not read above the threshold)."""
        screen_batches = self.transfer.screen_batches(self.gate.screen)
        if screen_batches is not None:
            value = self.score(candidate, f"{name}_screen", screen_batches)
            if value <= self.threshold:
                return value, False
        return self.score(candidate, name), True

    def recycled(self, choice: RecyclerChoice, recycler: Recycler, recycled_from: str | None) -> _Check:
        """``choice``'s candidate for the prompt (its fixed refinement included) and its check, made once."""
        if choice.key not in self.checks:
            transfer = self.transfer
            candidate = _on_target(recycler.transform(self.prompt, recycled_from), transfer.target)
            steps = 0
            if choice.refine is not None:
                outcome = distill(transfer.source, self.prompt, transfer.target, candidate.embeddings,
                                  choice.refine, transfer.trainer, seed=transfer.seed)  # fmt: skip
                candidate, steps = refined(candidate, outcome, choice.refine), outcome.steps
            value, whole = self.check(candidate, choice.label) if self.data is not None else (math.nan, True)
            self.checks[choice.key] = _Check(candidate, value, whole, steps)
        return self.checks[choice.key]

    def carried(self, choices: Sequence[tuple[RecyclerChoice, Recycler]]) -> bool:
        """Whether one of ``choices`` (tried before, in order) carries the prompt over its gate."""
        return any(self.recycled(choice, recycler, None).value > self.threshold for choice, recycler in choices)


def _failing(
    transfer: Transfer,
    gate: Gate,
    prompt: SoftPrompt,
    peers: Sequence[SoftPrompt],
    tried: Sequence[tuple[RecyclerChoice, Recycler]],
) -> int:
    """How many of ``peers`` (the transfer's prompts of ``prompt``'s task, ``prompt`` among them) the
    training-free maps ``tried`` do not carry over their gates. The checks made for the others are
    kept (:meth:`Transfer.judge`), so their own runs do not make them again."""
    judges = (transfer.judge(gate, peer, labelled_data_problem(peer, gate.split)) for peer in peers)
    return sum(not judge.carried(tried) for judge in judges if judge.data is not None)


def _run_policy(
    policy: Policy, transfer: Transfer, prompt: SoftPrompt, recycled_from: str | None, judging: bool, used: Compute
) -> PolicyOutcome:
    source, target = transfer.source, transfer.target
    gate = policy.gate
    records: list[StageRecord] = []
    problem = labelled_data_problem(prompt, gate.split) if judging else "evaluation is off"
    judge = transfer.judge(gate, prompt, problem)
    data, threshold, baselines = judge.data, judge.threshold, judge.baselines
    source_score, score = judge.source_score, judge.score
    if problem is None:
        log.info("Gate on %s/%s: %s", target.name, gate.split, judge.description)
    else:
        log.warning("Cannot gate %s: %s; recycling without a gate", recycled_from or "the prompt", problem)

    gate_flops = judge.gate_flops
    # the maps' fits and trainings, and the checks of the transfer's other prompts that decide whether to train
    # one (enough_failing): the transfer's cost, shared by its prompts
    map_seconds = map_flops = 0.0
    best: SoftPrompt | None = None
    best_score: float | None = None
    best_whole = True  # best_score is the whole split's (False: a gate screen's, which turned it away)

    def whole_best() -> float:
        """The best prompt's score on the whole split (one a screen turned away is read now)."""
        nonlocal best_score, best_whole
        if not best_whole:
            best_score, best_whole = score(best, "best_so_far"), True
        return best_score

    def improves(value: float | None) -> bool:
        """Whether a whole-split ``value`` beats the best prompt so far: one above the gate does
        (the best so far is not, or the policy would have stopped), at no extra check."""
        return value is not None and (value > threshold or value > whole_best())

    for index, stage in enumerate(policy.stages):
        start, flops_before = time.perf_counter(), used.flops
        if isinstance(stage, RecycleStage):
            record = StageRecord("recycle", FAILED)
            tried: list[tuple[RecyclerChoice, Recycler]] = []  # the training-free choices tried, in order
            for choice in stage.recyclers:
                if choice.when == "same_space":
                    same, why = transfer.same_space(choice.min_cosine)
                    if not same:
                        log.info("Not trying %s: %s", choice.label, why)
                        continue
                learn_from = transfer.peers(prompt) if choice.needs_prompts else None
                if choice.when == "enough_prompts" and len(learn_from) < choice.min_prompts:
                    log.info("Not trying %s: %d prompts of the task, fewer than its min_prompts %d",
                             choice.label, len(learn_from), choice.min_prompts)  # fmt: skip
                    continue
                if choice.when == "enough_failing" and data is not None and not transfer.trained(choice, prompt.task):
                    ahead_start, flops_ahead = time.perf_counter(), used.flops
                    failing = _failing(transfer, gate, prompt, learn_from, tried)
                    map_seconds += time.perf_counter() - ahead_start
                    map_flops += used.flops - flops_ahead
                    if failing < choice.min_prompts:
                        log.info("Not trying %s: %d of the task's %d prompts fail the maps before it, fewer "
                                 "than its min_prompts %d", choice.label, failing, len(learn_from),
                                 choice.min_prompts)  # fmt: skip
                        continue
                fit_start, flops_at_fit = time.perf_counter(), used.flops
                recycler = transfer.recycler(choice, learn_from if choice.train_map else None)
                map_seconds += time.perf_counter() - fit_start
                map_flops += used.flops - flops_at_fit
                made = judge.recycled(choice, recycler, recycled_from)  # made ahead, or now
                if choice.train_map is None and choice.refine is None:
                    tried.append((choice, recycler))
                candidate = (
                    made.candidate if recycled_from is None else made.candidate.replace(recycled_from=recycled_from)
                )
                record.steps += made.steps
                if data is None:  # nothing to judge by: the first applicable recycler's prompt
                    best, record.method = candidate, choice.label
                    break
                value, whole = made.value, made.whole
                record.tried[choice.label if whole else f"{choice.label} (screen)"] = value
                if best_score is None or value > best_score:
                    best, best_score, best_whole, record.method = candidate, value, whole, choice.label
                if value > threshold:
                    break
            if best is None:
                raise RecycleError(
                    "No recycler of the policy's recycle stage applies to this model pair: "
                    "add one without `when` to policy.stages[0].recyclers."
                )
        elif stage.skip:
            record = StageRecord(stage.name, SKIPPED, reason=f"the policy skips it (policy.stages.{index}.skip)")
        elif data is None:
            record = StageRecord(stage.name, SKIPPED, reason=problem)
        elif isinstance(stage, RefineStage):
            record = StageRecord("refine", FAILED, method=stage.settings.method)
            unlabelled = labelled_data_problem(prompt, stage.settings.split)
            if unlabelled is not None:
                record.status, record.reason = SKIPPED, f"no unlabelled inputs: {unlabelled}"
            elif stage.when == "teacher_passes" and source_score() <= threshold:
                record.status = SKIPPED
                record.reason = (
                    f"the teacher (the prompt on {source.name}) reads {source_score():.4f} on {gate.split}, "
                    f"not above the gate's {threshold:.4f}: a student matching it would not pass"
                )
            else:
                outcome = distill(
                    source,
                    _trained_like_validation(prompt, stage),
                    target,
                    best.embeddings,
                    stage.settings,
                    transfer.trainer,
                    seed=transfer.seed,
                    validation=data,
                    eval_every=stage.eval_every,
                    stop_above=threshold,
                    patience=stage.patience,
                    start_score=whole_best(),
                    metric=gate.metric,
                )
                record.steps = outcome.steps
                if outcome.plateaued:
                    improved = outcome.score is not None and outcome.score > best_score
                    bar = f"{outcome.score:.4f} (the start read {best_score:.4f})" if improved else f"{best_score:.4f}"
                    record.reason = (
                        f"stopped after {outcome.steps} of {stage.settings.steps} steps: {stage.patience} validations "
                        f"in a row did not improve on {bar} (the refine stage's `patience` in policy.stages)"
                    )
                if improves(outcome.score):
                    best, best_score = refined(best, outcome, stage.settings), outcome.score
        else:
            record = StageRecord("retune", FAILED, method="retune")
            labelled = labelled_data_problem(prompt, "train")
            if labelled is not None:
                record.status, record.reason = SKIPPED, f"no labelled training data: {labelled}"
            else:
                fresh = None
                random_prompt = baselines.random_prompt[gate.split]
                if stage.start == "best_or_init" and best_score < random_prompt:
                    fresh = prompt.init if prompt.init in INIT_METHODS else "vocab"
                    record.reason = (
                        f"started from a fresh {fresh} init: the best prompt so far read {best_score:.4f}, "
                        f"under the random-token prompt's {random_prompt:.4f} (start: best_or_init)"
                    )
                warm = _trained_like_validation(best, stage)
                outcome = _retune(stage, transfer, warm, threshold, gate.metric, fresh_init=fresh, screen=gate.screen)
                record.steps = outcome.steps
                if improves(outcome.score):
                    started = f"a fresh {fresh} init" if fresh else "the best prompt so far"
                    retuned_config = {**best.recycler_config, "retune": asdict(stage), "retune_started_from": started}
                    best = best.replace(
                        embeddings=outcome.prompt, recycler=f"{best.recycler}+retune", recycler_config=retuned_config
                    )
                    best_score = outcome.score
        record.seconds, record.flops = time.perf_counter() - start, used.flops - flops_before
        if isinstance(stage, RecycleStage):  # the maps' cost is the transfer's, recorded apart
            record.seconds, record.flops = record.seconds - map_seconds, record.flops - map_flops
        if record.status != SKIPPED:
            record.score = best_score
            if data is None:
                record.status = UNEVALUATED
            elif best_score > threshold:
                record.status = PASSED
        records.append(record)
        log.info("Policy stage %s: %s", record.stage, record.status)
        if record.status in (PASSED, UNEVALUATED):
            break

    verdict = UNEVALUATED if data is None else (PASSED if best_score > threshold else FAILED)
    reason = problem or ""
    if verdict == FAILED:
        reason = f"best {gate.split} accuracy {best_score:.4f} does not beat {threshold:.4f} after every stage"
        skipped = [f"{r.stage}: {r.reason}" for r in records if r.status == SKIPPED]
        reason += f" ({'; '.join(skipped)})" if skipped else ""
    cost = {kind: sum(getattr(r, kind) for r in records) for kind in ("steps", "seconds", "flops")}
    best = best.replace(cost={**cost, "parameters": target.parameters})
    outcome = PolicyOutcome(
        best, verdict, best_score, threshold, baselines, records, reason, judge.measured_source_score, gate_flops,
        map_flops, map_seconds,
    )  # fmt: skip
    log.info("Policy for %s: %s", recycled_from or "the prompt", outcome.summary())
    return outcome


def _retune(
    stage: RetuneStage,
    transfer: Transfer,
    start: SoftPrompt,
    threshold: float,
    metric: str = "accuracy",
    fresh_init: str | None = None,
    screen: int | None = None,
) -> FitOutcome:
    """Supervised tuning on the target from ``start`` (or, with ``fresh_init``, from a prompt of
    that init method drawn on the target with the transfer's seed), stopping once the gate passes;
    with ``screen`` (the gate's), each check reads that many examples first."""
    target = transfer.target
    screen_batches = transfer.screen_batches(screen)
    data = transfer.data(target, start, screen, batch_size=stage.batch_size, limit_train=stage.limit_train)
    initial = start.embeddings
    if fresh_init is not None:
        initial = initial_prompt(
            fresh_init,
            embedding_table(target.model),
            start.length,
            seed=transfer.seed,
            class_token_ids=data.encoder.verbalizer_ids,
            exclude_ids=target.tokenizer.all_special_ids,
        )
    module = PromptTuningModule(
        target.model,
        initial,
        optimizer=instantiate_partial(stage.optimizer, "policy.stages[retune].optimizer"),
        length_normalize=start.task.length_normalize,
        name="retune",
        objective=stage.objective,
    )
    L.seed_everything(transfer.seed, verbose=False)
    begin = f"a fresh {fresh_init} init" if fresh_init else "the best prompt so far"
    screened = f", each check on {data.screen} validation examples first" if screen_batches else ""
    log.info("Re-tuning on %s from %s: up to %d steps%s", target.name, begin, stage.steps, screened)
    return fit_prompt(
        module, transfer.trainer, steps=stage.steps, eval_every=stage.eval_every, stop_above_score=threshold,
        metric=metric, screen_batches=screen_batches, datamodule=data,
    )  # fmt: skip


def retune_reference(prompt: SoftPrompt, target: LoadedModel) -> dict[str, float] | None:
    """What re-tuning ``prompt`` from scratch on ``target`` would cost, from its recorded tuning cost.

    Steps as recorded; seconds, and FLOPs where recorded, scaled by the models' parameter counts
    (a step's compute is proportional to them). None when the prompt records no tuning cost.
    """
    cost = prompt.cost
    if not cost.get("steps") or not cost.get("seconds"):
        return None
    scale = target.parameters / cost["parameters"] if cost.get("parameters") else 1.0
    reference = {"steps": float(cost["steps"]), "seconds": float(cost["seconds"]) * scale}
    if cost.get("flops"):
        reference["flops"] = float(cost["flops"]) * scale
    return reference


__all__ = [
    "Policy",
    "PolicyOutcome",
    "RecycleStage",
    "RecyclerChoice",
    "RefineStage",
    "RetuneStage",
    "StageRecord",
    "Transfer",
    "fitter",
    "labelled_data_problem",
    "retune_reference",
    "run_policy",
]
