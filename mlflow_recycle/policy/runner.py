"""Run one prompt through a policy: the stages in order until one's prompt passes the gate."""

from __future__ import annotations

import logging
import time

from ..compute import metered
from ..models import LoadedModel
from ..prompt import SoftPrompt
from .config import Policy, RecycleStage, Stage
from .gate import PASSED, SKIPPED, UNEVALUATED
from .outcome import PolicyOutcome, StageRecord
from .stages import RUNNERS, Run
from .transfer import Transfer

log = logging.getLogger(__name__)


def run_policy(
    policy: Policy, transfer: Transfer, prompt: SoftPrompt, recycled_from: str | None = None, *, judge: bool = True
) -> PolicyOutcome:
    """Migrate ``prompt`` (on ``transfer.source``) to ``transfer.target`` under ``policy``.

    ``judge=False`` (evaluation off): the first applicable recycler's prompt, unevaluated.
    Each stage's record says its steps, seconds and model compute (its gate checks included).
    """
    gate = policy.gate
    problem = transfer.data_problem(prompt, gate.split) if judge else "evaluation is off"
    with metered() as used:
        run = Run(transfer, prompt, recycled_from, transfer.judge(gate, prompt, problem), used)
        if run.judging:
            log.info("Gate on %s/%s: %s", transfer.target.name, gate.split, run.judge.description)
        else:
            log.warning("Cannot gate %s: %s; recycling without a gate", recycled_from or "the prompt", problem)
        records: list[StageRecord] = []
        for stage in policy.stages:
            records.append(_stage(stage, run))
            log.info("Policy stage %s: %s", records[-1].stage, records[-1].status)
            if records[-1].status in (PASSED, UNEVALUATED):
                break
    outcome = _outcome(policy, run, records)
    log.info("Policy for %s: %s", recycled_from or "the prompt", outcome.summary())
    return outcome


def _stage(stage: Stage, run: Run) -> StageRecord:
    """Run one stage (or say why not), its cost measured without the maps' share, and with the gate checks
    it used at their share of the passes that made them with the prompt's peers."""
    start, flops, maps = time.perf_counter(), run.used.flops, (run.map_seconds, run.map_flops)
    ahead, paid = (run.transfer.ahead_seconds, run.transfer.ahead_flops), (run.paid_seconds, run.paid_flops)
    if not isinstance(stage, RecycleStage) and stage.skip:
        record = StageRecord(stage.name, SKIPPED, reason=f"the policy skips it (policy.stages.{stage.name}.skip)")
    elif not isinstance(stage, RecycleStage) and not run.judging:
        record = StageRecord(stage.name, SKIPPED, reason=run.judge.problem)
    else:
        record = RUNNERS[stage.name](stage, run)
        run.stages_run.append(stage.name)
    shared_seconds = run.map_seconds - maps[0] + run.transfer.ahead_seconds - ahead[0] - (run.paid_seconds - paid[0])
    shared_flops = run.map_flops - maps[1] + run.transfer.ahead_flops - ahead[1] - (run.paid_flops - paid[1])
    record.seconds = time.perf_counter() - start - shared_seconds
    record.flops = run.used.flops - flops - shared_flops
    if record.status != SKIPPED:
        record.score = run.score
        if not run.judging:
            record.status = UNEVALUATED
        elif run.judge.verdict(run.score, run.plateaued) == PASSED:
            record.status = PASSED
    return record


def _outcome(policy: Policy, run: Run, records: list[StageRecord]) -> PolicyOutcome:
    gate, judge = policy.gate, run.judge
    verdict = judge.verdict(run.score, run.plateaued) if run.judging else UNEVALUATED
    reason = judge.problem or ""
    if verdict != PASSED and run.judging:
        kept = judge.bar.gain_kept(run.score)
        share = f", {kept:.0%} of the source's gain" if kept is not None else ""
        reason = (f"best {gate.split} {gate.metric} {run.score:.4f}{share} does not beat {judge.bar.threshold:.4f} "
                  "after every stage")  # fmt: skip
        skipped = [f"{r.stage}: {r.reason}" for r in records if r.status == SKIPPED]
        reason += f" ({'; '.join(skipped)})" if skipped else ""
    cost = {kind: sum(getattr(r, kind) for r in records) for kind in ("steps", "seconds", "flops")}
    cost["parameters"] = run.transfer.target.parameters
    scratch = scratch_cost(run.prompt)  # what tuning the prompt from scratch cost: the yardstick, kept along
    best = run.best.replace(cost={**cost, **({"scratch": scratch} if scratch else {})})
    return PolicyOutcome(
        best, verdict, run.score, judge.bar, judge.baselines, records, gate.metric, reason, judge.source_score,
        judge.gate_flops, run.map_flops, run.map_seconds, policy.label, run.plateaued,
    )  # fmt: skip


def cost_metrics(outcome: PolicyOutcome, prompt: SoftPrompt, target: LoadedModel) -> dict[str, float]:
    """What the migration of ``prompt`` cost against tuning it from scratch on ``target``: seconds and, where
    counted, FLOPs (comparable across machines and loads); empty when the prompt records no tuning cost."""
    reference = retune_reference(prompt, target)
    if not reference:
        return {}
    metrics = {"retune_reference/steps": reference["steps"], "retune_reference/seconds": reference["seconds"]}
    metrics["policy/cost_fraction"] = outcome.seconds / reference["seconds"]
    if "flops" in reference:
        metrics["retune_reference/flops"] = reference["flops"]
        metrics["policy/compute_fraction"] = outcome.flops / reference["flops"]
    return metrics


def scratch_cost(prompt: SoftPrompt) -> dict[str, float] | None:
    """What tuning ``prompt`` from scratch cost: its own tuning's cost, or for a migrated prompt the one
    its migration kept (``cost["scratch"]``). None when neither is recorded."""
    cost = prompt.cost.get("scratch") or prompt.cost
    if not cost.get("steps") or not cost.get("seconds"):
        return None
    return {key: float(cost[key]) for key in ("steps", "seconds", "flops", "parameters") if cost.get(key)}


def retune_reference(prompt: SoftPrompt, target: LoadedModel) -> dict[str, float] | None:
    """What re-tuning ``prompt`` from scratch on ``target`` would cost, from :func:`scratch_cost`.

    Steps as recorded; seconds, and FLOPs where recorded, scaled by the models' parameter counts
    (a step's compute is proportional to them). None when the prompt records no tuning cost.
    """
    cost = scratch_cost(prompt)
    if cost is None:
        return None
    scale = target.parameters / cost["parameters"] if cost.get("parameters") else 1.0
    reference = {"steps": float(cost["steps"]), "seconds": float(cost["seconds"]) * scale}
    if cost.get("flops"):
        reference["flops"] = float(cost["flops"]) * scale
    return reference
