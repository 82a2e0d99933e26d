"""The gate: when a prompt counts as working on a model, decided on validation, never on test.

A gate sets a :class:`Bar` for each prompt it judges, from the target's baselines and, with
``keep_gain``, the gain the prompt had on its own base. :meth:`Gate.passes` and
:meth:`Gate.verdict` are the only places a pass is decided. A prompt re-tuned until validation
stopped improving passes over the floor alone: it is as good as the new base gets from its start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lightning_modules.modules import METRICS

from ..errors import RecycleError
from ..evaluation import SPLITS, Baselines

log = logging.getLogger(__name__)

PASSED, DEGRADED, FAILED, SKIPPED, UNEVALUATED = "passed", "degraded", "failed", "skipped", "unevaluated"


@dataclass(frozen=True)
class Bar:
    """What one prompt must reach on the gate split, in the gate's metric.

    ``floor``: the target's best baseline plus the gate's margin and standard errors; a prompt
    at or under it does not work on the target. ``keep``: the best baseline plus ``keep_gain``
    of the source prompt's own gain (None: the gate keeps no share).
    """

    floor: float
    best_baseline: float
    keep: float | None = None
    source_gain: float | None = None  # the source prompt over its own base's best baseline, on the gate split

    @property
    def threshold(self) -> float:
        """The score a prompt must exceed to pass."""
        return self.floor if self.keep is None else max(self.floor, self.keep)

    def gain_kept(self, score: float | None) -> float | None:
        """The share of the source prompt's gain that ``score`` keeps (None: no gain to keep, or not measured)."""
        if score is None or not self.source_gain or self.source_gain <= 0:
            return None
        return (score - self.best_baseline) / self.source_gain


@dataclass(frozen=True)
class Gate:
    """A prompt passes when its ``metric`` on ``split`` is strictly above its :class:`Bar`.

    The floor is the target's best baseline (max of zero-shot and a random prompt) plus
    ``margin`` points plus ``margin_se`` standard errors of that baseline (1.645: one-sided
    95%). With ``keep_gain`` the prompt must also keep that share of the gain its source prompt
    had over the source model's own best baseline. A prompt over the floor and under the share
    is ``degraded``: it works, but worse than it did.
    """

    split: str = "validation"
    margin: float = 0.0
    margin_se: float = 0.0
    keep_gain: float | None = None
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise RecycleError(f"policy.gate.metric may be {' or '.join(METRICS)}, got {self.metric!r}.")
        if self.split not in SPLITS:
            raise RecycleError(f"policy.gate.split may be {' or '.join(SPLITS)}, got {self.split!r}.")
        if self.split == "test":
            log.warning("policy.gate.split=test: decisions on the test split overfit the reported numbers")
        if self.keep_gain is not None and not 0 <= self.keep_gain <= 1:
            raise RecycleError(f"policy.gate.keep_gain is a share between 0 and 1, or null; got {self.keep_gain}.")
        if self.margin_se < 0:
            raise RecycleError(
                f"policy.gate.margin_se is a number of standard errors, 0 or more; got {self.margin_se}."
            )

    def bar(self, baselines: Baselines, source_gain: float | None = None) -> Bar:
        """The bar for a prompt judged against ``baselines``, whose source gained ``source_gain``."""
        best = baselines.best(self.split)
        floor = best + self.margin / 100
        if self.margin_se:
            floor += self.margin_se * baselines.standard_error(self.split)
        keep = None
        if self.keep_gain is not None and source_gain is not None:
            keep = best + self.keep_gain * max(0.0, source_gain)
        return Bar(floor, best, keep, source_gain)

    def passes(self, score: float | None, bar: Bar) -> bool:
        """Whether ``score`` passes ``bar``."""
        return score is not None and score > bar.threshold

    def verdict(self, score: float | None, bar: Bar, plateaued: bool = False) -> str:
        """``passed``; ``degraded`` (over the floor, under the share to keep); or ``failed``. ``plateaued``:
        re-tuning tuned on until validation stopped improving (``until: plateau``), so the prompt is as
        good as the new base gets from its start: over the floor, it passes."""
        over_floor = score is not None and score > bar.floor
        if self.passes(score, bar) or (plateaued and over_floor):
            return PASSED
        return DEGRADED if over_floor else FAILED

    def describe(self, bar: Bar, baselines: Baselines) -> str:
        """How the bar is made, for logs: ``accuracy > 0.6281 (best baseline 0.5920 + 1.645 x 0.0220 SE, n=500)``."""
        parts = [f"best baseline {bar.best_baseline:.4f}"]
        if self.margin:
            parts.append(f"{self.margin:g} points")
        if self.margin_se:
            parts.append(f"{self.margin_se:g} x {baselines.standard_error(self.split):.4f} SE")
        n = baselines.examples.get(self.split)
        shown = " + ".join(parts) + (f", n={n}" if n else "")
        if bar.keep is not None:
            shown += f"; keeping {self.keep_gain:g} of the source's {bar.source_gain:.4f} gain: {bar.keep:.4f}"
        return f"{self.metric} > {bar.threshold:.4f} ({shown})"
