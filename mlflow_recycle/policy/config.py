"""A migration policy's settings (``conf/policy/*.yaml``): the gate and up to three stages, by name.

Stages run in a fixed order, each from the best prompt so far, until one passes the gate:
``recycle`` (training-free maps, or a map trained on behaviour), ``refine`` (label-free
distillation from the source) and ``retune`` (supervised tuning on the target). A policy
names the stages it has under ``stages:``; ``recycle`` is required.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_modules.modules import OBJECTIVES

from ..errors import RecycleError
from ..recyclers import available_recyclers, recycler_class
from ..refine import DistillSettings
from .gate import Gate

STAGES = ("recycle", "refine", "retune")
#: When a recycler of the recycle stage is tried: ``same_space``, only when both models kept one
#: embedding space; ``enough_failing``, only when enough of the task's prompts fail the maps before it.
CONDITIONS = ("same_space", "enough_failing")
#: When the retune stage stops: at the gate's bar, or once validation stops improving.
UNTIL = ("bar", "plateau")


@dataclass(frozen=True)
class RecyclerChoice:
    """One recycler of the ``recycle`` stage.

    Args:
        name, options: the recycler (``conf/recycler/<name>.yaml`` shape).
        refine: a fixed refinement that is part of the method (``conf/recycler/distill.yaml``).
        train_map: train the fitted map on the behaviour of the transfer's prompts of the task
            (``conf/recycler/linear_behaviour.yaml``), once per model pair and task.
        when: ``same_space`` (tried when the tokenizer, dim and anchor embeddings agree to
            ``min_cosine``) or ``enough_failing`` (tried when at least ``min_prompts`` of the
            task's prompts fail every map tried before it); None: always.
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
        """What determines the map fitted on anchors: one fit per key and model pair."""
        return json.dumps({"name": self.name, "options": dict(self.options)}, sort_keys=True)

    @property
    def trained_key(self) -> str:
        """What determines a map trained on behaviour, besides the task and its prompts."""
        return json.dumps({"map": self.map_key, "train_map": asdict(self.train_map or DistillSettings())})

    @property
    def key(self) -> str:
        """What determines the choice's prompt for a given prompt: the map and the refinement."""
        return json.dumps({"trained": self.trained_key, "refine": asdict(self.refine) if self.refine else None})

    @property
    def training_free(self) -> bool:
        return self.train_map is None and self.refine is None

    @property
    def needs_prompts(self) -> bool:
        """Whether trying it needs the transfer's prompts of the task (to train on, or to count)."""
        return self.train_map is not None or self.when == "enough_failing"


@dataclass(frozen=True)
class RecycleStage:
    recyclers: tuple[RecyclerChoice, ...]
    name: str = "recycle"


@dataclass(frozen=True)
class RefineStage:
    """Label-free refinement on unlabelled task inputs, validated every ``eval_every`` steps;
    ``patience``: stop after that many validations in a row that do not improve on the best."""

    settings: DistillSettings
    eval_every: int = 25
    patience: int | None = None
    skip: bool = False
    name: str = "refine"


@dataclass(frozen=True)
class RetuneStage:
    """Supervised tuning on the target from the best prompt so far, validated every ``eval_every``
    steps; ``patience``: stop after that many validations in a row that do not improve on the best.
    ``until``: ``bar`` stops at the first validation over the gate's bar; ``plateau`` tunes on past it
    while validation improves. ``optimizer``: a ``_target_`` config (the target's recipe); ``objective``:
    ``lm`` or ``classes``. ``check_share``: where a check of the gate's draw would cost more than this
    share of the training steps between checks, checks are spaced out to it (:meth:`paced`)."""

    steps: int = 300
    eval_every: int = 50
    patience: int | None = None
    check_share: float | None = None
    optimizer: Mapping[str, Any] | None = None
    objective: str = "classes"
    batch_size: int = 32
    limit_train: int | None = None
    until: str = "bar"
    skip: bool = False
    name: str = "retune"

    @property
    def stops_at_bar(self) -> bool:
        return self.until == "bar"

    def check_steps(self, examples: int) -> float:
        """What a check of ``examples`` costs in training steps (:meth:`paced`)."""
        return examples / (2 * self.batch_size)

    def paced(self, examples: int) -> RetuneStage:
        """This stage for a gate draw of ``examples``. A check is one forward pass per example; a step is a
        forward and a backward pass over ``batch_size`` examples like them: a check costs about
        ``examples / (2 * batch_size)`` steps. Where that is over ``check_share`` of ``eval_every`` steps,
        checks are spaced out to keep the share. ``patience`` stays a number of checks: on a noisy tuning
        fewer checks are weaker evidence of a plateau (with half as many, SmolLM2's update stopped on its
        start). On a model tuned in small batches (SmolLM2's recipe: 8) a check of 500 sentences costs 31 steps."""
        if not self.check_share or not examples:
            return self
        every = max(self.eval_every, math.ceil(self.check_steps(examples) / self.check_share))
        return self if every == self.eval_every else replace(self, eval_every=every)


Stage = RecycleStage | RefineStage | RetuneStage


@dataclass(frozen=True)
class Policy:
    """The gate and the stages (``conf/policy/*.yaml``), in their fixed order."""

    gate: Gate
    stages: tuple[Stage, ...]

    @property
    def recycle(self) -> RecycleStage:
        return self.stages[0]

    def stage(self, name: str) -> Stage | None:
        """The stage called ``name``, or None when the policy has none."""
        return next((stage for stage in self.stages if stage.name == name), None)

    @property
    def label(self) -> str:
        """``identity/linear > retune(800)``: the stages that run, with their budgets."""
        parts = []
        for stage in self.stages:
            if isinstance(stage, RecycleStage):
                parts.append("/".join(choice.label for choice in stage.recyclers))
            elif not stage.skip:  # refine and retune
                steps = stage.settings.steps if isinstance(stage, RefineStage) else stage.steps
                parts.append(f"{stage.name}({steps})")
        return " > ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Everything that decides the outcome (for migration keys and run params)."""
        return {"gate": asdict(self.gate), "stages": {stage.name: asdict(stage) for stage in self.stages}}

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Policy:
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        gate = _built(Gate, values.get("gate") or {}, "policy.gate")
        stages = values.get("stages") or {}
        if not isinstance(stages, Mapping):
            raise RecycleError("policy.stages maps stage names to settings: recycle, and optionally refine, retune.")
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise RecycleError(f"Unknown policy stage(s) {unknown}: policy.stages may name {', '.join(STAGES)}.")
        if "recycle" not in stages:
            raise RecycleError("A policy has a recycle stage: set policy.stages.recycle.recyclers.")
        parse = {"recycle": _recycle, "refine": _refine, "retune": _retune}
        return cls(gate, tuple(parse[name](dict(stages[name] or {})) for name in STAGES if name in stages))


def _built(kind: type, values: Mapping[str, Any], where: str, fixed: tuple[str, ...] = ("name",)) -> Any:
    """``kind(**values)``, a wrong key refused with the keys ``where`` takes (not the ``fixed`` ones)."""
    known = [f.name for f in fields(kind) if f.name not in fixed]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RecycleError(f"Unknown setting(s) {unknown} in {where}; it takes {', '.join(known)}.")
    return kind(**values)


def _positive(where: str, values: Mapping[str, Any], *keys: str) -> None:
    """Refuse a count that is not a positive integer (null allowed where the stage has a default)."""
    for key in keys:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RecycleError(f"Bad {where}.{key}={value!r}: set a positive whole number, or null.")


def _recycle(values: dict[str, Any]) -> RecycleStage:
    recyclers = values.pop("recyclers", None) or ()
    _built(RecycleStage, {**values, "recyclers": ()}, "policy.stages.recycle")  # refuses unknown keys
    if not recyclers:
        raise RecycleError("The recycle stage needs recyclers: set policy.stages.recycle.recyclers.")
    return RecycleStage(tuple(_choice(dict(entry)) for entry in recyclers))


def _choice(entry: dict[str, Any]) -> RecyclerChoice:
    where = "policy.stages.recycle.recyclers"
    if "name" not in entry:
        raise RecycleError(f"Each of {where} needs a name, got {entry}.")
    name, refine, train_map = entry["name"], entry.pop("refine", None), entry.pop("train_map", None)
    if entry.get("when") not in (None, *CONDITIONS):
        raise RecycleError(
            f"Unknown when={entry['when']!r} for recycler {name!r}; choose {', '.join(CONDITIONS)} or null."
        )
    if train_map and not recycler_class(name).trainable:
        trainable = [n for n in available_recyclers() if recycler_class(n).trainable]
        raise RecycleError(
            f"The {name!r} recycler's map cannot be trained on behaviour: remove its train_map block, "
            f"or use one of {', '.join(trainable)} (recycler=linear_behaviour)."
        )
    _positive(f"{where}[{name}]", entry, "min_prompts")
    plain = {k: v for k, v in entry.items() if k not in ("name", "options")}
    return _built(RecyclerChoice, {
        **plain, "name": name, "options": entry.get("options") or {},
        "refine": DistillSettings.from_config(refine) if refine else None,
        "train_map": DistillSettings.from_config(train_map) if train_map else None,
    }, where, fixed=())  # fmt: skip


def _refine(values: dict[str, Any]) -> RefineStage:
    _positive("policy.stages.refine", values, "steps", "eval_every", "patience")
    own = {key: values.pop(key) for key in ("eval_every", "patience", "skip") if key in values}
    return _built(RefineStage, {**own, "settings": DistillSettings.from_config(values)}, "policy.stages.refine")


def _retune(values: dict[str, Any]) -> RetuneStage:
    _positive("policy.stages.retune", values, "steps", "eval_every", "patience", "batch_size", "limit_train")
    if values.get("objective", "classes") not in OBJECTIVES:
        raise RecycleError(
            f"Bad policy.stages.retune.objective={values['objective']!r}; choose one of {', '.join(OBJECTIVES)}."
        )
    if values.get("until", "bar") not in UNTIL:
        raise RecycleError(f"Bad policy.stages.retune.until={values['until']!r}; choose one of {', '.join(UNTIL)}.")
    share = values.get("check_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1):
        raise RecycleError(f"Bad policy.stages.retune.check_share={share!r}: set a share in (0, 1], or null.")
    if values.get("until") == "plateau" and not values.get("patience"):
        raise RecycleError(
            "policy.stages.retune.until=plateau needs policy.stages.retune.patience: set a number of checks."
        )
    return _built(RetuneStage, values, "policy.stages.retune")
