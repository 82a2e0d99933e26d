"""MLflow runs for the jobs: one run per job, nested under a parent in a Hydra multirun.

Only global rank 0 talks to MLflow: under DDP every rank runs the job script, and a run
must be started (or resumed from ``MLFLOW_RUN_ID``, as ``mlflow run`` asks) exactly once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _skip_the_absent_databricks_runtime() -> None:
    """MLflow asks for Databricks' runtime (``import dbruntime``) before every REST call, to add its
    headers; outside Databricks the import fails each time after searching every path: 0.1 s of a
    migrated prompt's 0.5 s. Where it is not installed, Python's own marker for a module that is not
    there (``sys.modules[name] = None``) makes the import fail at once."""
    if "dbruntime" not in sys.modules and importlib.util.find_spec("dbruntime") is None:
        sys.modules["dbruntime"] = None


_skip_the_absent_databricks_runtime()

#: Set by :class:`~mlflow_recycle.hydra_callbacks.MlflowParentRun` for the jobs of a multirun.
PARENT_RUN_ENV = "MLFLOW_RECYCLE_PARENT_RUN_ID"


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


#: The experiment id :func:`configure` last chose. ``mlflow.set_experiment`` exports it as
#: ``MLFLOW_EXPERIMENT_ID``, so that variable holding this value is our own choice, not the caller's.
_chosen_experiment_id: str | None = None


def configure(tracking_uri: str, experiment: str) -> None:
    """Point MLflow at the tracking store (every rank: all may read prompts) and, on rank 0, the experiment.

    ``MLFLOW_RUN_ID`` (set by ``mlflow run``) or an ``MLFLOW_EXPERIMENT_ID`` the caller set wins
    over ``mlflow.experiment``; an id this process exported itself does not (a second job in the
    same process, e.g. against another tracking store, chooses its experiment again).
    """
    global _chosen_experiment_id
    mlflow.set_tracking_uri(tracking_uri)
    if not is_rank_zero() or os.environ.get("MLFLOW_RUN_ID"):
        return
    inherited = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if inherited and inherited != _chosen_experiment_id:
        mlflow.set_experiment(experiment_id=inherited)  # checks it exists in this store
        return
    _chosen_experiment_id = mlflow.set_experiment(experiment).experiment_id


@contextmanager
def job_run(run_name: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[str | None]:
    """Start the job's run and yield its id (None off rank 0).

    In a multirun the run is a child of the parent run; otherwise ``mlflow.start_run``
    resumes ``MLFLOW_RUN_ID`` when ``mlflow run`` set it, or starts a new run.
    """
    if not is_rank_zero():
        yield None
        return
    parent = os.environ.get(PARENT_RUN_ENV)
    kwargs: dict[str, Any] = {"run_name": run_name, "tags": dict(tags or {})}
    if parent:
        kwargs.update(parent_run_id=parent, nested=True)
    with mlflow.start_run(**kwargs) as run:
        log.info("MLflow run %s (experiment %s)", run.info.run_id, run.info.experiment_id)
        try:
            yield run.info.run_id
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C during training into sys.exit(1)
            mlflow.end_run("KILLED")
            log.error(
                "Interrupted: MLflow run %s is marked KILLED; what it logged so far stays in it, and nothing "
                "was registered (a job registers its prompts only when it ends).",
                run.info.run_id,
            )
            raise


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted keys, the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class JobRunLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into the job's run, which the job (not Lightning) ends.

    ``conf/logger/mlflow.yaml`` builds it inside the job's run: ``run_id`` defaults to the
    active run, ``tracking_uri`` to the job's store.
    """

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None, **kwargs: Any) -> None:
        active = mlflow.active_run()
        run_id = run_id or (active.info.run_id if active else None)
        if run_id is None:
            raise RuntimeError("JobRunLogger writes into the job's MLflow run: start one first (or pass run_id).")
        super().__init__(tracking_uri=tracking_uri or mlflow.get_tracking_uri(), run_id=run_id, **kwargs)

    def finalize(self, status: str = "success") -> None:
        pass

    def log_hyperparams(self, params: Any) -> None:
        """Nothing: the job logs its whole composed config as the run's params, and a run that
        tunes twice (source, then target) would otherwise log ``name`` twice with two values."""


def lightning_logger(config: Any) -> Any:
    """The Lightning logger for training curves (``conf/logger``) on rank 0; False off rank 0 or
    when ``logger`` is null."""
    if not is_rank_zero() or not config:
        return False
    from hydra.utils import instantiate

    return instantiate(config)
