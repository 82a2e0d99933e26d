"""The migration policy: recycle, gate on validation, refine without labels, re-tune from the recycled start.

A policy (``conf/policy/*.yaml``) is a :class:`Gate` and up to three stages, by name. A prompt
goes through them in order until one produces a prompt that passes the gate on the target's
validation split; each stage starts from the best prompt so far:

- ``recycle``: recyclers tried in order (training-free maps fitted once per model pair, or a
  map trained, label-free, on the behaviour of the transfer's prompts of the task);
- ``refine``: label-free teacher-student refinement, validated, stopping at the gate;
- ``retune``: supervised tuning on the target from the best prompt so far, the same early stop.

Layout: :mod:`.config` (settings), :mod:`.gate` (the only place a pass is decided),
:mod:`.transfer` (the model pair, its data, baselines and maps), :mod:`.stages` (one runner per
stage), :mod:`.runner` (:func:`run_policy`), :mod:`.outcome` (records and metrics),
:mod:`.build` (the one builder of a transfer from a config). No MLflow here.
"""

from .build import build_policy, build_transfer
from .config import Policy, RecyclerChoice, RecycleStage, RefineStage, RetuneStage
from .gate import DEGRADED, FAILED, PASSED, SKIPPED, UNEVALUATED, Bar, Gate
from .outcome import PolicyOutcome, StageRecord
from .runner import cost_metrics, retune_reference, run_policy
from .stages import initial_on_target, tune_on_target
from .transfer import Judge, MapStore, Transfer, labelled_data_problem

__all__ = [
    "DEGRADED",
    "FAILED",
    "PASSED",
    "SKIPPED",
    "UNEVALUATED",
    "Bar",
    "Gate",
    "Judge",
    "MapStore",
    "Policy",
    "PolicyOutcome",
    "RecycleStage",
    "RecyclerChoice",
    "RefineStage",
    "RetuneStage",
    "StageRecord",
    "Transfer",
    "build_policy",
    "build_transfer",
    "cost_metrics",
    "initial_on_target",
    "labelled_data_problem",
    "retune_reference",
    "run_policy",
    "tune_on_target",
]
