"""The tuning-recipe search: a Hydra grid of prompt tunings on each model, decided on validation.

Each model's grid is one Hydra multirun of ``job=tune`` with ``experiment=recipe_search``
(``conf/experiment/recipe_search.yaml``: the grid, the task ``sst2_plain``, validation only),
logged to MLflow (a parent run per sweep, a child per point). This script runs those sweeps
and summarises them: each point's best validation accuracy next to the model's validation
baselines (zero-shot, random-token prompt), and the recipe whose smallest gain over the
models is largest. The test split is never read: it is left for the benchmark's report.

    python bench/recipe_search.py                                  # every model of the family
    python bench/recipe_search.py --models small-a --grid prompt.optimizer.lr=0.1,0.3
    python bench/recipe_search.py --report-only                    # re-summarise the runs
    python bench/recipe_search.py --quick --out /tmp/r             # CI smoke test

A model whose grid already has a finished run for every point is not searched again (the
runs are kept in ``bench/cache/recipe_search.db``, or ``--tracking-uri``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docs_update import bench_logging, update_section  # noqa: E402

from mlflow_recycle.config import compose  # noqa: E402
from mlflow_recycle.evaluation import Evaluator  # noqa: E402
from mlflow_recycle.models import load_model  # noqa: E402
from mlflow_recycle.tuning import data_module, task_spec  # noqa: E402

log = logging.getLogger("bench.recipe")

MODELS = ["small-a-early", "small-a", "small-b", "large", "small-c"]
EXPERIMENT = "recipe_search"
METRIC = "validation/source_accuracy"
QUICK = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "task.limit_train=32",
    "eval.limit_val=16",
    "task.batch_size=8",
]


def sweep_params(grid: list[str]) -> dict[str, list[str]]:
    """The grid: ``hydra.sweeper.params`` of the experiment, ``--grid key=a,b`` replacing entries
    (as the same override on a multirun's command line does)."""
    experiment = OmegaConf.load(ROOT / "conf" / "experiment" / f"{EXPERIMENT}.yaml")
    params = {key: str(values).split(",") for key, values in experiment.hydra.sweeper.params.items()}
    for item in grid:
        key, _, values = item.partition("=")
        if values:
            params[key] = values.split(",")
        else:  # `key=`: off the grid, so each model runs it at its own recipe's value
            params.pop(key, None)
    return params


def point_label(point: dict[str, str]) -> str:
    return ", ".join(f"{key.removeprefix('prompt.').removeprefix('prompt/')}={value}" for key, value in point.items())


class Search:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.params = sweep_params(args.grid)
        grid = itertools.product(*self.params.values())
        self.points = [dict(zip(self.params, values, strict=True)) for values in grid]
        self.extra = QUICK if args.quick else []
        self.defaults = compose([f"experiment={EXPERIMENT}"])

    # ------------------------------------------------------------------ runs
    def runs(self, model: str) -> dict[str, float]:
        """Best validation accuracy of each finished point of ``model`` (the latest run of a point)."""
        import mlflow

        mlflow.set_tracking_uri(self.args.tracking_uri)
        experiment = mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return {}
        found = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"params.`source.name` = '{model}' AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            output_format="list",
        )
        scores = {}
        for run in found:
            if METRIC not in run.data.metrics:
                continue  # a parent run
            point = {key: self.point_value(run.data.params, key) for key in self.params}
            scores[point_label(point)] = run.data.metrics[METRIC]
        return scores

    def point_value(self, params: dict[str, str], key: str) -> str:
        """A point's value as the run logged it: a config value, or a group's pick (``prompt/scheduler``).
        A run from before a setting existed ran at the setting's default (``prompt.objective``: lm)."""
        logged = params.get(f"choices.{key}" if "/" in key else key)
        if logged is None and "/" not in key:
            return str(OmegaConf.select(self.defaults, key, default=""))
        return logged or ""

    @property
    def experiment_name(self) -> str:
        return "recipe-search-quick" if self.args.quick else "recipe-search"

    def search(self, model: str) -> None:
        missing = [p for p in self.points if point_label(p) not in self.runs(model)]
        if not missing:
            log.info("%s: every point of the grid has a finished run", model)
            return
        log.info("%s: sweeping %d points (%d missing)", model, len(self.points), len(missing))
        command = [
            sys.executable, "-m", "mlflow_recycle", "-m", f"experiment={EXPERIMENT}", f"model@source={model}",
            f"mlflow.tracking_uri={self.args.tracking_uri}", f"mlflow.experiment={self.experiment_name}",
            f"threads={self.args.threads}", f"hydra.sweep.dir={self.args.cache}/recipe_search/{model}",
            "hydra.sweeper.params=null", *(f"{key}={','.join(values)}" for key, values in self.params.items()),
            *self.extra,
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT)

    # ------------------------------------------------------------------ baselines
    def baselines(self, model: str) -> dict[str, float]:
        """Zero-shot and mean random-prompt accuracy on validation (cached: they do not depend on the recipe)."""
        cfg = compose([f"experiment={EXPERIMENT}", f"model@source={model}", *self.extra])
        path = Path(self.args.cache) / "recipe_search" / f"baselines-{model}-{cfg.task.name}-{cfg.eval.limit_val}.json"
        if path.exists():
            return json.loads(path.read_text())
        side = load_model(cfg.source)
        evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("validation",), 3, cfg.seed)
        result = evaluator.baselines(side, data_module(side, task_spec(cfg.task), cfg), cfg.prompt.length)
        values = {"zero_shot": result.zero_shot["validation"], "random_prompt": result.random_prompt["validation"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
        return values

    # ------------------------------------------------------------------ report
    def report(self, models: list[str]) -> str:
        scores = {model: self.runs(model) for model in models}
        baselines = {model: self.baselines(model) for model in models}
        best = {model: max(values.values()) for model, values in baselines.items()}
        labels = [point_label(p) for p in self.points]
        header = "| recipe | " + " | ".join(models) + " | smallest gain |"
        lines = [header, "|---" * (len(models) + 2) + "|"]
        for name, key in (("zero-shot", "zero_shot"), ("random prompt", "random_prompt")):
            cells = [f"{baselines[m][key]:.3f}" for m in models]
            lines.append(f"| _{name}_ | " + " | ".join(cells) + " | |")
        smallest = {}
        for label in labels:
            gains = [scores[m][label] - best[m] for m in models if label in scores[m]]
            smallest[label] = min(gains) if len(gains) == len(models) else None
            cells = [
                f"{scores[m][label]:.3f} ({100 * (scores[m][label] - best[m]):+.1f})" if label in scores[m] else "—"
                for m in models
            ]
            gain = f"{100 * smallest[label]:+.1f}" if smallest[label] is not None else "—"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain} |")
        complete = {label: gain for label, gain in smallest.items() if gain is not None}
        chosen = max(complete, key=complete.get) if complete else None
        meta = (
            f"_Generated by `python bench/recipe_search.py` on {platform.machine()}, "
            f"{self.args.threads} threads, torch {torch.__version__}: validation accuracy of each tuning's "
            "best validation prompt "
            f"(in parentheses: points over the model's best validation baseline)._"
        )
        verdict = (
            f"Chosen on validation (the largest smallest gain over the models): **{chosen}**."
            if chosen
            else "No recipe has run on every model yet."
        )
        return "\n".join([meta, "", *lines, "", verdict])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument(
        "--grid", nargs="*", default=[],
        help="key=a,b replaces that entry of the experiment's grid; key= takes it off (each model's own value)",
    )  # fmt: skip
    parser.add_argument("--cache", default=str(ROOT / "bench" / "cache"))
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///<cache>/recipe_search.db")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small-a, two steps per point: a smoke test")
    parser.add_argument("--out", default=None, help="with --quick: where its cache and docs go")
    args = parser.parse_args()
    bench_logging()
    if args.quick:
        out = Path(args.out or "recipe-search-quick")
        args.models, args.cache, args.docs = ["small-a"], str(out / "cache"), str(out / "benchmarks.md")
        args.grid = args.grid or ["prompt.optimizer.lr=0.1", "prompt/scheduler=constant,one_cycle"]
    args.tracking_uri = args.tracking_uri or f"sqlite:///{Path(args.cache).resolve()}/recipe_search.db"
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    search = Search(args)
    if not args.report_only:
        for model in args.models:
            search.search(model)
    body = search.report(args.models)
    print(body)
    update_section(Path(args.docs), "recipe-search", body)


if __name__ == "__main__":
    main()
