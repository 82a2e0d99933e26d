"""One runner per stage. Each takes the stage's settings and the :class:`Run` of one prompt,
moves the run's best prompt forward when it finds a better one, and returns the stage's record.
Decisions go through the run's :class:`~mlflow_recycle.policy.transfer.Judge` (the gate)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache

import lightning as L
import torch

from lightning_modules import FitOutcome, PromptTuningModule, StackedPromptTuningModule, fit_prompt, fit_prompts

from ..anchors import embedding_table
from ..compute import Compute, metered
from ..config import instantiate_partial
from ..errors import RecycleError
from ..prompt import SoftPrompt
from ..prompt_init import INIT_METHODS, initial_prompt
from ..recyclers import Recycler
from ..refine import distill, refined
from .config import RecyclerChoice, RecycleStage, RefineStage, RetuneStage
from .gate import FAILED, SKIPPED
from .outcome import StageRecord
from .transfer import Check, Judge, Transfer

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One prompt going through a policy: what its stages share, and the best prompt so far."""

    transfer: Transfer
    prompt: SoftPrompt
    recycled_from: str | None
    judge: Judge
    used: Compute  # every model pass since the run began
    best: SoftPrompt | None = None
    score: float | None = None  # the best prompt's gate score
    map_seconds: float = 0.0  # the maps' fits and trainings, and checks ahead of the prompt's peers
    map_flops: float = 0.0
    paid_seconds: float = 0.0  # the shares of gate checks made ahead with the prompt's peers, paid on use
    paid_flops: float = 0.0
    stages_run: list[str] = field(default_factory=list)  # the stages that ran so far (not skipped)
    plateaued: bool = False  # re-tuned until validation stopped improving (``until: plateau``)

    def pay(self, check: Check | Retuned) -> None:
        """Count ``check``'s share of the pass (or stack) that made it as this run's, once."""
        if not check.paid:
            check.paid = True
            self.paid_seconds, self.paid_flops = self.paid_seconds + check.seconds, self.paid_flops + check.flops

    @property
    def judging(self) -> bool:
        return self.judge.data is not None

    def improve(self, prompt: SoftPrompt, score: float | None) -> bool:
        """Keep ``prompt`` when it scores above the best so far (or is the first)."""
        if self.best is not None and (score is None or (self.score is not None and score <= self.score)):
            return False
        self.best, self.score = prompt, score
        return True

    @contextmanager
    def on_maps(self) -> Iterator[None]:
        """Count what runs inside as the maps' cost, shared by the transfer's prompts (gate checks made
        inside decide on a map: they are paid there)."""
        start, flops, self.transfer.for_maps = time.perf_counter(), self.used.flops, True
        try:
            yield
        finally:
            self.transfer.for_maps = False
            self.map_seconds += time.perf_counter() - start
            self.map_flops += self.used.flops - flops


# ---------------------------------------------------------------------- recycle
def recycle(stage: RecycleStage, run: Run) -> StageRecord:
    """The recyclers in order, until one's prompt passes the gate; the best one is kept."""
    record = StageRecord("recycle", FAILED)
    tried: list[tuple[RecyclerChoice, Recycler]] = []  # the training-free choices tried, in order
    for choice in stage.recyclers:
        why_not = _why_not(choice, run, tried)
        if why_not:
            log.info("Not trying %s: %s", choice.label, why_not)
            continue
        with run.on_maps():
            recycler = run.transfer.recycler(choice, run.transfer.peers(run.prompt) if choice.train_map else None)
        made = run.judge.recycled(choice, recycler)
        run.pay(made)
        if choice.training_free:
            tried.append((choice, recycler))
        candidate = made.candidate.replace(recycled_from=run.recycled_from) if run.recycled_from else made.candidate
        record.steps += made.steps
        if not run.judging:  # nothing to judge by: the first applicable recycler's prompt
            run.best, record.method = candidate, choice.label
            break
        record.tried[choice.label] = made.score
        if run.improve(candidate, made.score):
            record.method = choice.label
        passes = run.judge.passes(made.score)
        score = "n/a" if made.score is None else f"{made.score:.4f}"
        side = "over the bar" if passes else "under the bar"
        log.info("Recycled by %s: %s %s on the gate's draw, %s", choice.label, run.judge.gate.metric, score, side)
        if passes:
            break
    if run.best is None:
        raise RecycleError(
            "No recycler of the policy's recycle stage applies to this model pair: "
            "add one without `when` to policy.stages.recycle.recyclers."
        )
    return record


def _why_not(choice: RecyclerChoice, run: Run, tried: list[tuple[RecyclerChoice, Recycler]]) -> str | None:
    """Why ``choice`` is not tried for this prompt (None: it is)."""
    transfer = run.transfer
    if choice.when == "same_space":
        same, why = transfer.same_space(choice.min_cosine)
        return None if same else why
    if choice.when != "enough_failing" or not run.judging:
        return None
    peers = transfer.peers(run.prompt)
    if transfer.has_map(transfer.trained_key(choice, peers)):
        return None  # trained for a peer already: using it costs a transform and a check
    with run.on_maps():
        failing = _failing(transfer, run.judge, peers, tried)
    if failing >= choice.min_prompts:
        return None
    return (
        f"{failing} of the task's {len(peers)} prompts fail the maps before it, "
        f"fewer than its min_prompts {choice.min_prompts}"
    )


def _failing(transfer: Transfer, judge: Judge, peers: list[SoftPrompt], tried) -> int:
    """How many of ``peers`` the training-free maps ``tried`` do not carry over their gates. The
    checks made for the others are kept (:meth:`Transfer.judge`): their own runs reuse them."""
    judges = (transfer.judge(judge.gate, peer, transfer.data_problem(peer, judge.gate.split)) for peer in peers)
    return sum(not peer.carried(tried) for peer in judges if peer.data is not None)


# ---------------------------------------------------------------------- refine
def refine(stage: RefineStage, run: Run) -> StageRecord:
    """Label-free distillation from the source, validated, stopping at the gate or a plateau."""
    record = StageRecord("refine", FAILED, method=stage.settings.method)
    unlabelled = run.transfer.data_problem(run.prompt, stage.settings.split)
    if unlabelled is not None:
        record.status, record.reason = SKIPPED, f"no unlabelled inputs: {unlabelled}"
        return record
    transfer, judge = run.transfer, run.judge
    outcome = distill(
        transfer.source, like_validation(run.prompt), transfer.target, run.best.embeddings, stage.settings,
        transfer.trainer, seed=transfer.seed, validation=judge.data, eval_every=stage.eval_every,
        stop_above=judge.bar.threshold, patience=stage.patience, start_score=run.score, metric=judge.gate.metric,
    )  # fmt: skip
    record.steps, record.reason = outcome.steps, _plateau(outcome, stage.settings.steps, stage.patience, "refine")
    run.improve(refined(run.best, outcome, stage.settings), outcome.score)
    return record


# ---------------------------------------------------------------------- retune
def retune(stage: RetuneStage, run: Run) -> StageRecord:
    """Supervised tuning on the target from the best prompt so far, stopping at the gate or a plateau."""
    record = StageRecord("retune", FAILED, method="retune")
    labelled = run.transfer.data_problem(run.prompt, "train")
    if labelled is not None:
        record.status, record.reason = SKIPPED, f"no labelled training data: {labelled}"
        return record
    best, stage = run.best, paced(stage, run.judge)
    made = _retuned(stage, run)
    run.pay(made)
    outcome = made.outcome
    record.steps, record.reason = outcome.steps, _plateau(outcome, stage.steps, stage.patience, "retune")
    run.plateaued = not stage.stops_at_bar and outcome.plateaued
    config = {**best.recycler_config, "retune": asdict(stage)}
    run.improve(best.replace(embeddings=outcome.prompt, recycler=f"{best.recycler}+retune", recycler_config=config),
                outcome.score)  # fmt: skip
    return record


@dataclass
class Retuned:
    """One prompt's re-tuning, made in a stack with its peers', with its share of the stack's cost."""

    outcome: FitOutcome
    seconds: float
    flops: float
    paid: bool = False


def _retuned(stage: RetuneStage, run: Run) -> Retuned:
    """The run's re-tuning, made together with the peers at the same point (the recycle stage alone behind
    them, the same maps tried and failed), up to ``eval.prompts_per_pass`` prompts in one stack; kept in
    each peer's judge, so its own run finds it made."""
    key = json.dumps(asdict(stage), sort_keys=True, default=str)
    if key not in run.judge.retunes:
        starts = [(run.judge, run.best, run.score)]
        if run.stages_run == ["recycle"]:
            starts += _peers_at_retune(run, key)
        _tune_together(stage, run.transfer, starts[: run.transfer.pass_size], key)
    return run.judge.retunes[key]


def _peers_at_retune(run: Run, key: str) -> list[tuple[Judge, SoftPrompt, float]]:
    """The run's peers whose recycle stage went as the run's did, with their best candidates and scores."""
    transfer, judge, found = run.transfer, run.judge, []
    for peer in transfer.checked_with(run.prompt):
        other = transfer.judge(judge.gate, peer, transfer.data_problem(peer, judge.gate.split))
        checks = list(other.checks.values())
        if other.data is None or key in other.retunes or set(other.checks) != set(judge.checks):
            continue
        if not checks or any(other.passes(c.score) for c in checks) or transfer.data_problem(peer, "train"):
            continue
        best = max(checks, key=lambda c: c.score)  # the first of the best, as Run.improve keeps it
        found.append((other, best.candidate, best.score))
    return found


def _tune_together(stage: RetuneStage, transfer: Transfer, starts: list[tuple[Judge, SoftPrompt, float]], key: str):
    """Re-tune the ``starts`` (judge, prompt, score) as one stack (:func:`lightning_modules.fit_prompts`): each
    gets the tuning it would get alone. The whole cost goes ahead; each share is paid by its prompt's run."""
    first = starts[0][1]
    task = like_validation(first).task
    data = transfer.data(transfer.target, first.replace(task=task), batch_size=stage.batch_size,
                         limit_train=stage.limit_train)  # fmt: skip
    optimizer = instantiate_partial(stage.optimizer, "policy.stages.retune.optimizer")
    module = StackedPromptTuningModule(
        transfer.target.model, torch.stack([prompt.embeddings for _, prompt, _ in starts]), optimizer=optimizer,
        length_normalize=task.length_normalize, name="retune", objective=stage.objective,
    )  # fmt: skip
    L.seed_everything(transfer.seed, verbose=False)
    log.info("Tuning %d prompt(s) on %s together: up to %d steps, a check every %d", len(starts),
             transfer.target.name, stage.steps, stage.eval_every)  # fmt: skip
    start = time.perf_counter()
    with metered() as used:
        outcomes = fit_prompts(
            module, transfer.trainer, steps=stage.steps, eval_every=stage.eval_every,
            thresholds=[judge.bar.threshold if stage.stops_at_bar else None for judge, _, _ in starts],
            patience=stage.patience,
            start_scores=[score for _, _, score in starts], metric=starts[0][0].gate.metric, datamodule=data,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    transfer.ahead_seconds, transfer.ahead_flops = transfer.ahead_seconds + seconds, transfer.ahead_flops + used.flops
    steps = sum(o.steps for o in outcomes)
    for (judge, _, _), outcome in zip(starts, outcomes, strict=True):
        share = outcome.steps / steps if steps else 1 / len(starts)
        judge.retunes[key] = Retuned(outcome, seconds * share, used.flops * share)


def tune_on_target(
    stage: RetuneStage,
    transfer: Transfer,
    judge: Judge,
    prompt: SoftPrompt,
    initial: torch.Tensor,
    start_score: float | None = None,
    stop_above: float | None = None,
) -> FitOutcome:
    """Tune ``initial`` on the target with ``prompt``'s task, validated every ``eval_every`` steps on the
    gate's draw, stopping after ``patience`` checks without gain or at the first validation over
    ``stop_above`` (by default the prompt's bar where the stage stops at it, else none)."""
    task, stage = like_validation(prompt).task, paced(stage, judge)
    data = transfer.data(transfer.target, prompt.replace(task=task), batch_size=stage.batch_size,
                         limit_train=stage.limit_train)  # fmt: skip
    optimizer = instantiate_partial(stage.optimizer, "policy.stages.retune.optimizer")
    module = PromptTuningModule(
        transfer.target.model, initial, optimizer=optimizer, length_normalize=task.length_normalize, name="retune",
        objective=stage.objective,
    )  # fmt: skip
    L.seed_everything(transfer.seed, verbose=False)
    log.info("Tuning on %s: up to %d steps, a check every %d", transfer.target.name, stage.steps, stage.eval_every)
    return fit_prompt(
        module, transfer.trainer, steps=stage.steps, eval_every=stage.eval_every,
        stop_above_score=judge.bar.threshold if stop_above is None and stage.stops_at_bar else stop_above,
        patience=stage.patience, start_score=start_score,
        metric=judge.gate.metric, datamodule=data,
    )  # fmt: skip


def paced(stage: RetuneStage, judge: Judge) -> RetuneStage:
    """``stage`` with checks spaced for what a check of the judge's draw costs (:meth:`RetuneStage.paced`)."""
    examples = judge.baselines.examples.get(judge.gate.split, 0) if judge.baselines is not None else 0
    spaced = stage.paced(examples)
    if spaced is not stage:
        _say_paced(examples, stage.check_steps(examples), stage.batch_size, spaced.eval_every, stage.check_share)
    return spaced


@cache
def _say_paced(examples: int, cost: float, batch_size: int, every: int, share: float) -> None:
    log.info("A check of %d validation examples costs about %.0f steps of %d: checking every %d steps, so that "
             "checks cost at most %.0f%% of the steps between them (policy.stages.retune.check_share=%s)",
             examples, cost, batch_size, every, 100 * share, share)  # fmt: skip


def initial_on_target(transfer: Transfer, prompt: SoftPrompt) -> torch.Tensor:
    """A fresh prompt on the target, initialised as ``prompt`` was on its source (its init, the transfer's seed)."""
    target = transfer.target
    data = transfer.data(target, prompt)
    return initial_prompt(
        prompt.init if prompt.init in INIT_METHODS else "vocab", embedding_table(target.model), prompt.length,
        seed=transfer.seed, class_token_ids=data.encoder.verbalizer_ids, exclude_ids=target.tokenizer.all_special_ids,
    )  # fmt: skip


def like_validation(prompt: SoftPrompt) -> SoftPrompt:
    """``prompt`` whose task trains on what its validation rule keeps (SST-2: phrases of 12+ words, like test's)."""
    if prompt.task is None:
        return prompt
    return prompt.replace(task=prompt.task.replace(train_min_words=prompt.task.validation_min_words))


def _plateau(outcome: FitOutcome, budget: int, patience: int | None, stage: str) -> str:
    if not outcome.plateaued:
        return ""
    return (f"stopped after {outcome.steps} of {budget} steps: {patience} checks in a row did not improve "
            f"(policy.stages.{stage}.patience)")  # fmt: skip


RUNNERS = {"recycle": recycle, "refine": refine, "retune": retune}
