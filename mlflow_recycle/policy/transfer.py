"""One source -> target model pair and what a policy's stages share on it: the data, the
baselines, the fitted maps (one cache) and each prompt's gate (:class:`Judge`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_modules import TrainerFactory, read_examples

from ..anchors import DEFAULT_OFFSET, DEFAULT_SIZE, embedding_table
from ..compute import metered
from ..errors import RecycleError
from ..evaluation import Baselines, Evaluator, task_data
from ..models import LoadedModel
from ..prompt import SoftPrompt
from ..recycle import fit_recycler
from ..recyclers import Recycler, get_recycler
from ..refine import distill, distill_map, refined
from .config import RecyclerChoice
from .gate import Gate

log = logging.getLogger(__name__)

#: Makes a map and says what making it cost: ``() -> (recycler, metrics)``.
MapMaker = Callable[[], tuple[Recycler, dict[str, float]]]
#: Where maps live beyond one transfer: ``store(key, label, make)`` returns the map stored under ``key``
#: (a JSON string), or ``make()``'s, stored. A migration keeps them in MLflow runs; None: in memory only.
MapStore = Callable[[str, str, MapMaker], Recycler]


@dataclass
class Transfer:
    """One source -> target pair, with what the stages need to run on it.

    Args:
        source, target: the two loaded models.
        trainer: builds Lightning trainers (``instantiate(cfg.trainer, _partial_=True)``).
        prompts: the prompts this transfer migrates: a map trained on behaviour learns from those of
            a prompt's task, and ``when: enough_failing`` counts them.
        limit_val, eval_batch_size, random_draws, seed, prompts_per_pass: evaluation settings (``conf/eval``).
        anchor_offset, anchor_size: the anchors the maps are fitted on (``conf/anchors``).
        store: where fitted and trained maps are kept beyond this transfer (a migration's MLflow runs).
        migrating: the prompts this transfer's runs will migrate (default: ``prompts``): a gate check is
            made for them together, in passes of several prompts (:meth:`check_ahead`).
    """

    source: LoadedModel
    target: LoadedModel
    trainer: TrainerFactory
    prompts: Sequence[SoftPrompt] = ()
    limit_val: int | None = 500
    eval_batch_size: int = 64
    random_draws: int = 3
    seed: int = 0
    prompts_per_pass: int = 1
    anchor_offset: int = DEFAULT_OFFSET
    anchor_size: int = DEFAULT_SIZE
    store: MapStore | None = None
    migrating: Sequence[SoftPrompt] | None = None
    costs: dict[str, float] = field(default_factory=dict)  # what making each map cost, summed by metric
    #: What :meth:`check_ahead` spent outside the maps, all of it: its checks' shares are paid by their runs.
    ahead_seconds: float = 0.0
    ahead_flops: float = 0.0
    for_maps: bool = False  # checks made now decide on a map: the maps' cost, paid already
    _maps: dict[str, Recycler] = field(default_factory=dict, repr=False)
    _baselines: dict[tuple[Any, ...], Baselines] = field(default_factory=dict, repr=False)
    _judges: dict[tuple[Any, ...], Judge] = field(default_factory=dict, repr=False)
    _scores: dict[tuple[Any, ...], float] = field(default_factory=dict, repr=False)
    _mean_cosine: float | None = field(default=None, repr=False)
    _data: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    _problems: dict[tuple[Any, ...], str | None] = field(default_factory=dict, repr=False)

    def peers(self, prompt: SoftPrompt) -> list[SoftPrompt]:
        """The transfer's prompts of ``prompt``'s task, ``prompt`` among them (added when it is not)."""
        same = [p for p in self.prompts if p.task == prompt.task]
        if not any(p.length == prompt.length and torch.equal(p.embeddings, prompt.embeddings) for p in same):
            same.append(prompt)
        return same

    @property
    def pass_size(self) -> int:
        """How many prompts one pass (a check, a report, a re-tuning stack) takes: ``prompts_per_pass``, at least 1."""
        return max(self.prompts_per_pass, 1)

    def checked_with(self, prompt: SoftPrompt) -> list[SoftPrompt]:
        """The prompts that may share a pass with ``prompt``: the others being migrated of its task and
        length; none when a pass takes one prompt (``prompts_per_pass``)."""
        if self.pass_size == 1:
            return []
        held = self.prompts if self.migrating is None else self.migrating
        return [p for p in held if p.task == prompt.task and p.length == prompt.length and p.digest != prompt.digest]

    # ------------------------------------------------------------------ maps
    def recycler(self, choice: RecyclerChoice, prompts: Sequence[SoftPrompt] | None = None) -> Recycler:
        """``choice``'s map fitted on the pair's anchors, once; with ``train_map`` and ``prompts``, that map
        trained on their behaviour, once per task and set of prompts."""
        fitted = self._map({"fit": choice.map_key}, f"fit {choice.name}", lambda: self._fit(choice))
        if choice.train_map is None or not prompts:
            return fitted
        key = self.trained_key(choice, prompts)
        return self._map(
            key, f"train {choice.label} map on {len(prompts)} prompts", lambda: self._train(choice, fitted, prompts)
        )

    @staticmethod
    def trained_key(choice: RecyclerChoice, prompts: Sequence[SoftPrompt]) -> dict[str, Any]:
        task = prompts[0].task.to_dict() if prompts[0].task else None
        return {"trained": choice.trained_key, "task": task, "prompts": sorted(p.digest for p in prompts)}

    def has_map(self, key: dict[str, Any]) -> bool:
        return json.dumps(key, sort_keys=True) in self._maps

    def _map(self, key: dict[str, Any], label: str, make: MapMaker) -> Recycler:
        text = json.dumps(key, sort_keys=True)
        if text not in self._maps:

            def costed() -> tuple[Recycler, dict[str, float]]:
                recycler, metrics = make()
                for name, value in metrics.items():  # costs add up; other figures (anchors) are the last map's
                    summed = name.endswith(("_seconds", "_flops", "_steps"))
                    self.costs[name] = self.costs.get(name, 0.0) + value if summed else value
                return recycler, metrics

            self._maps[text] = self.store(text, label, costed) if self.store else costed()[0]
        return self._maps[text]

    def _fit(self, choice: RecyclerChoice) -> tuple[Recycler, dict[str, float]]:
        start = time.perf_counter()
        recycler = fit_recycler(
            get_recycler(choice.name, **choice.options), self.source.model, self.source.tokenizer,
            self.target.model, self.target.tokenizer, anchor_offset=self.anchor_offset, anchor_size=self.anchor_size,
        )  # fmt: skip
        stats = getattr(recycler, "anchor_stats", None) or {}
        metrics = {f"anchors_{key}": float(value) for key, value in stats.items()}
        return recycler, {**metrics, "recycler_fit_seconds": time.perf_counter() - start}

    def _train(self, choice: RecyclerChoice, fitted: Recycler, prompts: Sequence[SoftPrompt]):
        trained, outcome = distill_map(
            self.source, prompts, self.target, fitted, choice.train_map, self.trainer, seed=self.seed
        )
        costs = {"map_steps": outcome.steps, "map_seconds": outcome.seconds, "map_flops": outcome.compute.flops}
        return trained, costs | ({"map_agreement": outcome.agreement} if outcome.agreement is not None else {})

    # ------------------------------------------------------------------ data and baselines
    def judge(self, gate: Gate, prompt: SoftPrompt, problem: str | None) -> Judge:
        """The gate for ``prompt`` (``problem``: why it cannot be judged), built once per prompt and gate."""
        key = (prompt.digest, gate, problem, self.seed, self.limit_val, self.eval_batch_size, self.random_draws)
        if key not in self._judges:
            self._judges[key] = Judge(gate, self, prompt, problem)
        return self._judges[key]

    def data_problem(self, prompt: SoftPrompt, split: str) -> str | None:
        """:func:`labelled_data_problem`, read once per task and split in this transfer (a migration asks for
        each of its prompts)."""
        key = (prompt.task, split)
        if key not in self._problems:
            self._problems[key] = labelled_data_problem(prompt, split)
        return self._problems[key]

    def evaluator(self, split: str, metric: str = "accuracy") -> Evaluator:
        return Evaluator(self.trainer, (split,), self.random_draws, self.seed, metric, self.prompts_per_pass)

    def data(self, side: LoadedModel, prompt: SoftPrompt, **settings: Any):
        """The prompt's task on ``side``, with the gate's draw of validation: one data module (tokenised once)
        per task, prompt length and settings, shared by the prompts of the transfer."""
        key = (
            side.uri,
            prompt.task,
            prompt.length,
            self.eval_batch_size,
            self.limit_val,
            self.seed,
            *sorted(settings.items()),
        )
        if key not in self._data:
            self._data[key] = task_data(
                side, prompt.task, prompt_length=prompt.length, eval_batch_size=self.eval_batch_size,
                limit_val=self.limit_val, seed=self.seed, **settings,
            )  # fmt: skip
        return self._data[key]

    def baselines(self, side: LoadedModel, prompt: SoftPrompt, split: str, data, metric: str = "accuracy") -> Baselines:
        """Zero-shot and random-prompt ``metric`` of ``side`` on ``data``'s draw of ``split``, measured once per
        task, prompt length, metric, draw and random-prompt seed."""
        key = (side.uri, prompt.task, prompt.length, split, metric, _draw(data, split), self.seed, self.random_draws)
        if key not in self._baselines:
            self._baselines[key] = self.evaluator(split, metric).baselines(side, data, prompt.length)
        return self._baselines[key]

    def score(self, side: LoadedModel, prompt: SoftPrompt, split: str, data, metric: str = "accuracy") -> float:
        """``metric`` of ``prompt`` on ``side`` and ``data``'s draw of ``split``: measured once, or as
        :meth:`known` was told (a tuning that kept the prompt by its score on the same examples). The
        prompt's peers of the same length are measured with it, in passes of several prompts."""
        key = self._score_key(side, prompt, split, data, metric)
        if key not in self._scores:
            peers = [prompt, *self.checked_with(prompt)]
            todo = [p for p in peers if self._score_key(side, p, split, data, metric) not in self._scores]
            todo = todo[: self.pass_size]
            reports = self.evaluator(split, metric).reports(side, data, [p.embeddings for p in todo], "source")
            for peer, report in zip(todo, reports, strict=True):
                self._scores[self._score_key(side, peer, split, data, metric)] = report[split].value(metric)
        return self._scores[key]

    def check_ahead(self, judge: Judge, choice: RecyclerChoice, recycler: Recycler) -> None:
        """``choice``'s candidate for ``judge``'s prompt and for the peers that would try it next (checked
        with it, at the same point of the recycle stage, none passed yet), scored on the gate in passes of
        several prompts and kept in each peer's judge: their runs find them made, and pay their share."""
        start = time.perf_counter()
        with metered() as judging:
            judges = [judge, *self._next_to_try(judge, choice)][: self.pass_size]
        with metered() as checking:
            made = [j.candidate(choice, recycler) for j in judges]
            scores = [math.nan] * len(judges)
            if judge.data is not None:
                evaluator = self.evaluator(judge.gate.split, judge.gate.metric)
                reports = evaluator.reports(self.target, judge.data, [c.embeddings for c, _ in made], choice.label)
                scores = [r[judge.gate.split].value(judge.gate.metric) for r in reports]
        seconds, spent = time.perf_counter() - start, judging.flops + checking.flops
        if not self.for_maps:
            self.ahead_seconds, self.ahead_flops = self.ahead_seconds + seconds, self.ahead_flops + spent
        share = seconds * checking.flops / max(spent, 1.0) / len(judges), checking.flops / len(judges)
        for j, (candidate, steps), score in zip(judges, made, scores, strict=True):
            j.checks[choice.key] = Check(candidate, score, steps, *share, paid=self.for_maps)

    def _next_to_try(self, judge: Judge, choice: RecyclerChoice) -> list[Judge]:
        if judge.data is None or choice.refine is not None:
            return []  # nothing to score, or a candidate that trains: one at a time
        gate = judge.gate
        judges = [self.judge(gate, p, self.data_problem(p, gate.split)) for p in self.checked_with(judge.prompt)]
        return [
            j for j in judges
            if j.data is not None and set(j.checks) == set(judge.checks)
            and not any(j.passes(check.score) for check in j.checks.values())
        ]  # fmt: skip

    def known(self, side: LoadedModel, prompt: SoftPrompt, split: str, data, metric: str, value: float) -> None:
        """Record a score measured elsewhere on ``data``'s draw of ``split``: :meth:`score` does not measure
        it again where its own draw is the same."""
        self._scores[self._score_key(side, prompt, split, data, metric)] = value

    @staticmethod
    def _score_key(side: LoadedModel, prompt: SoftPrompt, split: str, data, metric: str) -> tuple[Any, ...]:
        return side.uri, prompt.digest, split, metric, _draw(data, split)

    def same_space(self, min_cosine: float) -> tuple[bool, str]:
        """Whether the target kept the source's embedding space (same tokenizer and dim, close rows)."""
        if self.source.fingerprint != self.target.fingerprint:
            return False, "the tokenizers differ"
        source, target = embedding_table(self.source.model), embedding_table(self.target.model)
        if source.shape != target.shape:
            return False, f"the embedding tables differ in shape ({tuple(source.shape)} vs {tuple(target.shape)})"
        cosine = self._cosine()
        if cosine < min_cosine:
            return False, f"mean embedding cosine {cosine:.3f} < min_cosine {min_cosine}"
        return True, f"mean embedding cosine {cosine:.3f}"

    def _cosine(self) -> float:
        """The mean cosine of the two embedding tables' rows (same shape), measured once."""
        if self._mean_cosine is None:
            source, target = embedding_table(self.source.model), embedding_table(self.target.model)
            self._mean_cosine = float(
                torch.nn.functional.cosine_similarity(source.float(), target.float(), dim=1).mean()
            )
        return self._mean_cosine


@dataclass
class Check:
    """A recycler's candidate for one prompt and its gate score, with its share of the pass that scored it
    (``paid``: already counted, as the maps' cost when it decided on a map)."""

    candidate: SoftPrompt
    score: float
    steps: int
    seconds: float = 0.0
    flops: float = 0.0
    paid: bool = False


class Judge:
    """The gate for one prompt of a transfer: the target's data on the gate split's draw, its
    baselines, the prompt's :class:`Bar`, and the recycle stage's checks of the prompt (kept, so
    that a check made ahead for a peer, ``when: enough_failing``, is not made twice). What
    building it cost (measuring the gate) is :attr:`gate_flops`."""

    def __init__(self, gate: Gate, transfer: Transfer, prompt: SoftPrompt, problem: str | None) -> None:
        self.gate, self.transfer, self.prompt, self.problem = gate, transfer, prompt, problem
        self.data = self.bar = self.baselines = None
        self.description = ""
        self.checks: dict[str, Check] = {}  # by RecyclerChoice.key
        self.retunes: dict[str, Any] = {}  # the prompt's re-tunings, made in a stack with its peers', by stage
        self.source_score: float | None = None
        with metered() as used:
            if problem is None:
                self.data = transfer.data(transfer.target, prompt)
                self.baselines = transfer.baselines(transfer.target, prompt, gate.split, self.data, gate.metric)
                self.bar = gate.bar(self.baselines, self._source_gain() if gate.keep_gain is not None else None)
                self.description = gate.describe(self.bar, self.baselines)
        self.gate_flops = used.flops

    def _source_gain(self) -> float:
        """The source prompt's gain over its own model's best baseline, on the gate split."""
        side, gate = self.transfer.source, self.gate
        data = self.transfer.data(side, self.prompt)
        self.source_score = self.transfer.score(side, self.prompt, gate.split, data, gate.metric)
        return self.source_score - self.transfer.baselines(side, self.prompt, gate.split, data, gate.metric).best(
            gate.split
        )

    def passes(self, score: float | None) -> bool:
        return self.gate.passes(score, self.bar)

    def verdict(self, score: float | None, plateaued: bool = False) -> str:
        return self.gate.verdict(score, self.bar, plateaued)

    def recycled(self, choice: RecyclerChoice, recycler: Recycler) -> Check:
        """``choice``'s candidate for the prompt (its fixed refinement included) and its score, made once
        (with its peers': :meth:`Transfer.check_ahead`)."""
        if choice.key not in self.checks:
            self.transfer.check_ahead(self, choice, recycler)
        return self.checks[choice.key]

    def candidate(self, choice: RecyclerChoice, recycler: Recycler) -> tuple[SoftPrompt, int]:
        """``choice``'s candidate for the prompt, with the steps its fixed refinement took."""
        transfer = self.transfer
        candidate = on_target(recycler.transform(self.prompt, None), transfer.target)
        if choice.refine is None:
            return candidate, 0
        outcome = distill(transfer.source, self.prompt, transfer.target, candidate.embeddings, choice.refine,
                          transfer.trainer, seed=transfer.seed)  # fmt: skip
        return refined(candidate, outcome, choice.refine), outcome.steps

    def carried(self, choices: Sequence[tuple[RecyclerChoice, Recycler]]) -> bool:
        """Whether one of ``choices`` (tried before, in order) carries the prompt over its gate."""
        return any(self.passes(self.recycled(choice, recycler).score) for choice, recycler in choices)


def _draw(data, split: str) -> tuple[int, int | None]:
    """Which examples of ``split`` a data module evaluates on: its seed and its limit."""
    return data.seed, data.limits[split]


def on_target(prompt: SoftPrompt, target: LoadedModel) -> SoftPrompt:
    return prompt.replace(base_model=target.name, base_model_uri=target.uri, base_model_version=None)


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
