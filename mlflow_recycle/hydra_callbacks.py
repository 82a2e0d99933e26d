"""Hydra callback: one MLflow parent run around a multirun, one nested run per job.

``python -m mlflow_recycle -m recycler=linear,mlp`` then shows one parent run with a child
per recycler. Under ``mlflow run`` the run it created (``MLFLOW_RUN_ID``) is the parent.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from .tracking import PARENT_RUN_ENV, configure, is_rank_zero

log = logging.getLogger(__name__)


class MlflowParentRun(Callback):
    """Creates the parent run at multirun start and closes it at the end."""

    def __init__(self) -> None:
        self._created: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():
            return
        configure(config.mlflow.tracking_uri, config.mlflow.experiment)
        client = MlflowClient()
        # Jobs must start children, not resume the run that `mlflow run` created.
        parent = os.environ.pop("MLFLOW_RUN_ID", None)
        if parent is None:
            import mlflow

            experiment = mlflow.get_experiment_by_name(config.mlflow.experiment)
            run = client.create_run(experiment.experiment_id, run_name=config.mlflow.run_name or "multirun")
            parent = self._created = run.info.run_id
        os.environ[PARENT_RUN_ENV] = parent
        log.info("Multirun parent MLflow run %s", parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.pop(PARENT_RUN_ENV, None)
        if self._created and parent == self._created:
            MlflowClient().set_terminated(self._created, RunStatus.to_string(RunStatus.FINISHED))
