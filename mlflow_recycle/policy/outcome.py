"""What a policy did to one prompt: each stage's record, the verdict, and what it all cost."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..evaluation import Baselines
from ..prompt import SoftPrompt
from .gate import PASSED, Bar


@dataclass
class StageRecord:
    """What one stage did: its status, the gate score after it, and what it cost."""

    stage: str
    status: str  # passed | failed | skipped | unevaluated
    method: str = ""
    score: float | None = None  # the best prompt's score on the gate split after the stage
    steps: int = 0
    seconds: float = 0.0
    flops: float = 0.0  # model compute (mlflow_recycle.compute), its gate evaluations included
    reason: str = ""
    tried: dict[str, float] = field(default_factory=dict)  # recycle: each recycler's gate score


@dataclass
class PolicyOutcome:
    """The migrated prompt and how it got there.

    ``gate``: ``passed``, ``degraded`` (works on the target, keeps less of the source's gain
    than the gate asks), ``failed`` or ``unevaluated``. ``gate_flops``: measuring the gate's
    baselines, paid by the first prompt of a transfer to need them. ``map_flops`` and
    ``map_seconds``: fitting or training the recycle stage's maps, paid by the first prompt to
    need them. Neither is in :attr:`flops`.
    """

    prompt: SoftPrompt
    gate: str
    score: float | None  # the prompt's score on the gate split
    bar: Bar | None
    baselines: Baselines | None
    records: list[StageRecord]
    metric: str = "accuracy"
    reason: str = ""
    source_score: float | None = None  # the source prompt on its own model, on the gate split (when measured)
    gate_flops: float = 0.0
    map_flops: float = 0.0
    map_seconds: float = 0.0
    policy: str = ""  # the policy's label: its stages and budgets
    plateaued: bool = False  # re-tuned until validation stopped improving (``until: plateau``)

    @property
    def at_plateau(self) -> bool:
        """Passed on a plateau of re-tuning, under the share of the source's gain the gate asks."""
        return self.gate == PASSED and self.plateaued and self.score is not None and self.score <= self.threshold

    @property
    def threshold(self) -> float | None:
        return None if self.bar is None else self.bar.threshold

    @property
    def gain_kept(self) -> float | None:
        """The share of the source prompt's gain kept on the gate split (None when not measured)."""
        return None if self.bar is None else self.bar.gain_kept(self.score)

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
        """Per stage and in total: steps, seconds, FLOPs, the gate score after it; the bar and the gain kept."""
        gate_score = f"gate_{self.metric}"
        metrics: dict[str, float] = {
            "policy/steps": self.steps,
            "policy/seconds": self.seconds,
            "policy/flops": self.flops,
        }
        if self.bar is not None:
            metrics["policy/gate_threshold"] = self.bar.threshold
            metrics["policy/gate_floor"] = self.bar.floor
        if self.gain_kept is not None:
            metrics["policy/gain_kept"] = self.gain_kept
        if self.source_score is not None:
            metrics[f"policy/source_{gate_score}"] = self.source_score
        metrics.update({"policy/gate_flops": self.gate_flops, "policy/map_flops": self.map_flops})
        metrics["policy/map_seconds"] = self.map_seconds
        for record in self.records:
            prefix = f"policy/{record.stage}"
            metrics.update({f"{prefix}/steps": record.steps, f"{prefix}/seconds": record.seconds})
            metrics[f"{prefix}/flops"] = record.flops
            if record.score is not None:
                metrics[f"{prefix}/{gate_score}"] = record.score
            for method, score in record.tried.items():  # "linear+distill(100)" -> "linear_distill_100"
                metrics[f"{prefix}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', method).strip('_')}_{gate_score}"] = score
        return metrics

    def description(self, source: str | None, compute_fraction: float | None = None) -> str:
        """What a person reads first on the migrated version's page: where it came from, how it got
        there, the verdict, the share of its gain kept and what it cost."""
        where = f" at {self.stage}" if self.stage else ""
        base, version = self.prompt.base_model, self.prompt.base_model_version
        target = f"{base} v{version}" if version else base  # a tied prompt names its registered version
        lines = [f"Migrated from {source or 'a prompt'} to {target} by {self.policy}: {self.gate}{where}."]
        if self.gain_kept is not None:
            lines.append(f"Keeps {self.gain_kept:.0%} of its source prompt's gain on validation "
                         f"({self.metric} {self.score:.3f}, bar {self.threshold:.3f}).")  # fmt: skip
        elif self.score is not None:
            lines.append(f"Validation {self.metric} {self.score:.3f}, bar {self.threshold:.3f}.")
        if self.at_plateau:
            lines.append("Re-tuned until validation stopped improving: as good as the new base gets from its start.")
        if self.gate != PASSED and self.reason:
            lines.append(self.reason[0].upper() + self.reason[1:] + ".")
        share = f", {compute_fraction:.1%} of tuning it from scratch" if compute_fraction is not None else ""
        lines.append(f"Cost: {self.steps} training steps, {self.flops:.3g} FLOPs{share}.")
        return " ".join(lines)

    def summary(self) -> str:
        """One line: the verdict, the share of the source's gain kept, and each stage's status, score and cost."""
        parts = []
        for r in self.records:
            value = f" {r.score:.3f}" if r.score is not None else ""
            why = f" ({r.reason})" if r.reason else ""
            name = f"{r.stage}[{r.method}]" if r.method else r.stage
            parts.append(f"{name} {r.status}{value}, {r.steps} steps, {r.seconds:.1f} s, {r.flops:.2g} FLOPs{why}")
        threshold = f" > {self.threshold:.3f}" if self.threshold is not None else ""
        kept = f", {self.gain_kept:.0%} of the source's gain kept" if self.gain_kept is not None else ""
        maps = f"; the maps: {self.map_seconds:.1f} s, {self.map_flops:.2g} FLOPs" if self.map_flops else ""
        plateau = " at a plateau" if self.at_plateau else ""
        return f"gate {self.gate}{plateau}{threshold}{kept}: " + "; ".join(parts) + maps
