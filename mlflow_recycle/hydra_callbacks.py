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
        if parent and is_rank_zero():
            summarize_children(parent)
        if self._created and parent == self._created:
            MlflowClient().set_terminated(self._created, RunStatus.to_string(RunStatus.FINISHED))


#: What the parent's comparison shows of each child, where the children have it.
SUMMARY_METRICS = (
    "test/recycled_accuracy",
    "test/best_baseline_accuracy",
    "validation/recycled_accuracy",
    "validation/best_baseline_accuracy",
    "validation/source_accuracy",
    "test/source_accuracy",
    "test/prompt_accuracy",
    "success",
)


def summarize_children(parent: str) -> dict[str, list] | None:
    """The multirun's comparison on its parent run: a table (``multirun_summary.json``, also as
    markdown) with a row per child, its swept settings (the params that differ between
    children), accuracies and verdict; and a chart of the first accuracy they all have."""
    from .charts import accuracy_chart

    client = MlflowClient()
    run = client.get_run(parent)
    children = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["attributes.start_time ASC"]
    )
    if not children:
        return None
    keys = sorted({k for c in children for k in c.data.params})
    swept = [k for k in keys if len({c.data.params.get(k) for c in children}) > 1 and not k.startswith("choices.")]
    metrics = [m for m in SUMMARY_METRICS if any(m in c.data.metrics for c in children)]
    table: dict[str, list] = {"run": [c.info.run_name for c in children], "status": [c.info.status for c in children]}
    table.update({k: [c.data.params.get(k) for c in children] for k in swept})
    table.update({m: [c.data.metrics.get(m) for c in children] for m in metrics})
    table["verdict"] = [c.data.tags.get("mlflow_recycle.verdict", "") for c in children]
    client.log_table(parent, table, "multirun_summary.json")
    header = list(table)
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i in range(len(children)):
        cells = [table[h][i] for h in header]
        rows.append("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    client.log_text(parent, "\n".join(rows) + "\n", "multirun_summary.md")
    shown = next((m for m in metrics if m != "success" and "baseline" not in m), None)
    if shown and all(v is not None for v in table[shown]):
        labels = [
            ", ".join(f"{k.split('.')[-1]}={c.data.params.get(k)}" for k in swept) or c.info.run_name for c in children
        ]
        baselines = {c.data.metrics.get(shown.split("/")[0] + "/best_baseline_accuracy") for c in children}
        chart = accuracy_chart(
            dict(zip(labels, table[shown], strict=True)),
            baseline=baselines.pop() if len(baselines) == 1 and None not in baselines else None,
            title=f"multirun: {shown}",
            subjects=("",),
        )
        client.log_figure(parent, chart, "multirun_comparison.png")
    log.info("Multirun summary on parent run %s:\n%s", parent, "\n".join(rows))
    return table
