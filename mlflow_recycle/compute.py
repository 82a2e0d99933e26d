"""Model compute, counted rather than timed: what a tuning, an evaluation or a policy stage cost.

Seconds say what a piece of work cost on one machine under its load (on a shared 2-core CPU
the same work varies 1.5x); the positions a model processed and the FLOPs they take do not.
:class:`~mlflow_recycle.prompted_lm.PromptedLM` reports every forward pass to the meters open
in the current context, so a caller measures whatever runs inside ``with metered() as used:``
(training, validation, a teacher's forward passes) without threading counters through
Lightning. Meters nest: a pass counts in every open meter. A context is per thread, so
migrations in other threads do not mix; each DDP process counts its own share.

FLOPs follow Kaplan et al. (2020): ``2 * N`` per position forward, ``N`` the parameters a
position goes through (the layers; not the input embedding, a lookup), plus the output head
at the positions whose logits are kept; a backward pass through the frozen model costs the
same again (gradients of the activations only: no weight gradients), so a training position
is two forward positions. Attention's own term (``2 * layers * context * dim``) is left out:
under 3% for these contexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Compute:
    """Positions through the model (padding and prompt rows included: they are computed) and FLOPs."""

    forward: int = 0  # positions through a forward pass
    backward: int = 0  # of those, positions a backward pass went through (prompt training)
    flops: float = 0.0

    def add(self, other: Compute) -> None:
        self.forward += other.forward
        self.backward += other.backward
        self.flops += other.flops


def pass_compute(positions: int, kept: int, body_parameters: int, head_parameters: int, backward: bool) -> Compute:
    """A pass over ``positions`` through ``body_parameters``, and the head's ``head_parameters`` at ``kept`` of them."""
    flops = 2.0 * (body_parameters * positions + head_parameters * kept) * (2 if backward else 1)
    return Compute(positions, positions if backward else 0, flops)


_meters: ContextVar[tuple[Compute, ...]] = ContextVar("mlflow_recycle_compute_meters", default=())


@contextmanager
def metered() -> Iterator[Compute]:
    """A meter of every model pass made in this context until the block ends."""
    meter = Compute()
    token = _meters.set((*_meters.get(), meter))
    try:
        yield meter
    finally:
        _meters.reset(token)


def record(used: Compute) -> None:
    """Count ``used`` in every open meter (called by the model wrapper for each pass)."""
    for meter in _meters.get():
        meter.add(used)


__all__ = ["Compute", "metered", "pass_compute", "record"]
