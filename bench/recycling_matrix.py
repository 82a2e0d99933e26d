"""The recycling results matrix: the paper's experiment on the model family in ../shared.

For each task, ordered source -> target pair, recycler, prompt init and seed: tune a
prompt on the source (cached), recycle it, and evaluate on the target next to the
target's zero-shot and random-token-prompt baselines and a prompt re-tuned on the target
(the same init and seed). Rows go to ``bench/results/recycling_matrix.csv``; the summary
(per task and recipe, success by recycler x pair and the cost ratio; a heatmap) goes to
``docs/benchmarks.md`` and to one MLflow parent run with a child per cell.

    python bench/recycling_matrix.py                       # the full matrix (hours on a CPU)
    python bench/recycling_matrix.py --tasks sst2          # one task
    python bench/recycling_matrix.py --report-only         # re-summarise the CSV
    python bench/recycling_matrix.py --recyclers procrustes linear+distill:steps=50   # add cells
    python bench/recycling_matrix.py --quick --out /tmp/m  # CI smoke test
    python bench/recycling_matrix.py --workers 12 --set trainer.accelerator=gpu   # on one GPU, 12 processes

Tuned prompts are kept under ``bench/results/prompts`` (committed: tuning is the matrix's cost,
hours on a CPU, and a new machine starts without a cache) and evaluations under ``bench/cache``,
each keyed by everything that determines it, so a rerun only computes what changed, e.g. a new
recycler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import textwrap
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from docs_update import (  # noqa: E402
    bench_logging,
    bench_machine,
    in_processes,
    lock_csv,
    read_rows,
    rows_by_device,
    update_section,
    write_rows,
)

from mlflow_recycle.compute import metered  # noqa: E402
from mlflow_recycle.config import compose, with_overridden, with_recipe  # noqa: E402
from mlflow_recycle.evaluation import Evaluator  # noqa: E402
from mlflow_recycle.models import LoadedModel, load_model  # noqa: E402
from mlflow_recycle.prompt import SoftPrompt  # noqa: E402
from mlflow_recycle.recycle import fit_recycler  # noqa: E402
from mlflow_recycle.recyclers import get_recycler  # noqa: E402
from mlflow_recycle.refine import DistillSettings, distill, refined  # noqa: E402
from mlflow_recycle.tuning import data_module, task_spec, tune_prompt  # noqa: E402

log = logging.getLogger("bench.matrix")

COLUMNS = [
    "task", "objective", "source", "target", "recycler", "init", "seed", "recycled_acc", "zero_shot_acc",
    "random_prompt_acc", "source_acc", "retuned_acc", "success", "recycle_seconds", "retune_seconds", "device",
]  # fmt: skip
#: Where tuned prompts are kept (PEFT adapter directories of ~20 KB with their tuning record): in
#: git, beside the rows they produced, so that tuning done on one machine serves the next.
PROMPTS = ROOT / "bench" / "results" / "prompts"
#: source:target -> what changes between the two models (the paper's Base->Base', Base->Large, ...).
PAIRS = {
    "small-a:small-b": "another seed",
    "small-a:large": "larger",
    "large:small-a": "smaller",
    "small-a-early:small-a": "model update",
    "small-a:small-c": "other tokenizer",
    "small-c:small-a": "other tokenizer",
}
# Issue 15's criterion: the pairs across seeds and sizes (no shared lineage, the same tokenizer).
CROSS_PAIRS = ("small-a:small-b", "small-a:large", "large:small-a")
PAPER_RECYCLERS = ["linear", "lincomb", "mlp"]
RECYCLERS = [
    "identity", *PAPER_RECYCLERS, "procrustes", "procrustes:match_norm=true", "linear:ridge=auto", "relative",
    "linear+distill:steps=50", "linear+distill:steps=100",
]  # fmt: skip
INITS = ["random", "vocab", "class_labels"]
#: The tasks, paper's protocol first (``conf/task``), and what the matrix runs each with beyond
#: the tuning recipe, which is the configs' (``conf/prompt``, ``conf/trainer``, a model's
#: ``recipe:``), as for the job and migrations (documented in docs/benchmarks.md).
_SST2 = ["task.max_length=128", "eval.limit_test=null"]
_IMDB = ["task.max_length=128", "eval.limit_val=300", "eval.limit_test=500", "eval.batch_size=32"]
TASK_SETTINGS = {"sst2_plain": _SST2, "imdb_plain": _IMDB, "sst2": _SST2, "imdb": _IMDB}
#: Points above the best baseline for "success with a margin" (one standard error of a test
#: accuracy near 75% is 1.5 points on SST-2's 872 sentences, 1.9 on IMDB's 500 reviews).
MARGIN = 0.02
#: Steps of the two short tunings that time a step of re-tuning (:meth:`Matrix.retune_seconds`).
CALIBRATION_STEPS = (10, 30)
COMMON = [
    "trainer.max_steps=800",  # the recipe (the job's default budget is shorter)
    "trainer.enable_progress_bar=false",
    "eval.random_prompt_draws=3",
    "registry.register=false",
]
QUICK = [
    "trainer.max_steps=2",
    "task.limit_train=32",
    "eval.limit_val=16",
    "eval.limit_test=16",
    "task.batch_size=8",
    "eval.random_prompt_draws=1",
]


def digest(value: object) -> str:
    data = value.numpy().tobytes() if isinstance(value, torch.Tensor) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def plain(node) -> dict:
    """A config node as a dict for cache keys, without settings that leave prompts unchanged
    (so that adding an option with a neutral default does not invalidate the cache)."""
    values = OmegaConf.to_container(node, resolve=True)
    if "data" in values:  # the data as the checkout sees it (../shared/...), wherever the checkout is
        values["data"] = os.path.relpath(os.path.normpath(values["data"]), ROOT)
    neutral = {"regularizer": "none", "gamma": 0.0, "text_field": "text", "label_field": "label", "labels": [],
               "header": True}  # fmt: skip
    return {k: v for k, v in values.items() if k not in UNKEYED and neutral.get(k, object()) != v}


#: Settings left out of cache keys. ``instruction`` is read only by the wayward regulariser (keyed
#: through ``prompt.regularizer``). ``validation_min_words`` never changes a test accuracy; for a
#: tuned prompt it changes which of its validations' prompts is kept (the SST-2 prompts of
#: 2026-11-27, gone with that machine's cache, were kept on all validation phrases).
UNKEYED = ("instruction", "validation_min_words")


def parse_value(raw: str) -> object:
    """JSON values (``10``, ``true``), anything else as a bare string (``ridge=auto``)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_options(text: str) -> dict:
    return {key: parse_value(raw) for key, _, raw in (item.partition("=") for item in filter(None, text.split(",")))}


#: Spec options that choose the anchors (see :func:`mlflow_recycle.recycle.fit_recycler`), not the recycler.
ANCHOR_OPTIONS = ("anchor_offset", "anchor_size")


def parse_recycler(spec: str) -> tuple[str, dict, dict, DistillSettings | None]:
    """``"linear:ridge=10,anchor_size=1000+distill:steps=50"`` -> name, recycler options, anchor options, refinement."""
    mapping, _, refinement = spec.partition("+")
    name, _, text = mapping.partition(":")
    options = parse_options(text)
    anchor_options = {key: options.pop(key) for key in ANCHOR_OPTIONS if key in options}
    method, _, refine_options = refinement.partition(":")
    refine = DistillSettings.from_config({"method": method, **parse_options(refine_options)}) if method else None
    return name, options, anchor_options, refine


@dataclass
class Cache:
    """Tuned prompts (directories) and accuracies (one JSON-lines file) under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.evals_file = self.root / "evals.jsonl"
        self.evals = {}
        if self.evals_file.exists():
            text = self.evals_file.read_text()
            if not text.endswith("\n"):  # end a line cut by a killed run before appending to it
                with self.evals_file.open("a") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a run killed mid-write: that evaluation is simply redone
                    continue
                self.evals[record["key"]] = record["value"]

    def value(self, key: str, compute):
        if key not in self.evals:
            self.evals[key] = compute()
            with self.evals_file.open("a") as f:
                f.write(json.dumps({"key": key, "value": self.evals[key]}) + "\n")
        return self.evals[key]


class Matrix:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cache = args, Cache(Path(args.cache))
        # --quick's prompts are a smoke test's leftovers: they stay in the (temporary) cache
        self.prompts = self.cache.root / "prompts" if args.quick else Path(getattr(args, "prompts", None) or PROMPTS)
        self.models: dict[str, LoadedModel] = {}
        self.objectives: dict[tuple[str, str], str] = {}
        self._retune: dict[tuple[str, str], dict[str, float]] = {}

    def config(self, task: str, init: str = "vocab", seed: int = 0, model: str | None = None):
        """The job config the matrix tunes ``model`` with: the task's recipe, then the model's own
        (``recipe:`` in its conf/model entry, as the job and migrations use it)."""
        recipe = QUICK if self.args.quick else TASK_SETTINGS[task]
        models = [f"model@source={model}"] if model else []
        settings = getattr(self.args, "set", [])
        cfg = compose([f"task={task}", f"prompt.init={init}", f"seed={seed}", *models, *COMMON, *recipe, *settings])
        # the matrix's own settings are its protocol, under a model's recipe (e.g. its max_steps); --set is over it
        cfg = with_overridden(cfg, settings)
        return with_recipe(cfg, cfg.source) if model and not self.args.quick else cfg

    def objective(self, task: str, model: str) -> str:
        """What ``model``'s prompts for ``task`` are tuned on: ``prompt.objective`` of its recipe, and its
        regulariser when it has one (``classes+norm:0.01``, from ``--set prompt.regularizer=norm
        prompt.gamma=0.01``): rows and tables keep prompts of one recipe apart from those of another.
        Composed once per task and model."""
        if (task, model) not in self.objectives:
            prompt = self.config(task, model=model).prompt
            penalty = f"+{prompt.regularizer}:{prompt.gamma:g}" if prompt.regularizer != "none" else ""
            self.objectives[task, model] = prompt.objective + penalty
        return self.objectives[task, model]

    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            self.models[name] = load_model(compose([f"model@source={name}"]).source)
        return self.models[name]

    def prompt_path(self, task: str, model: str, init: str, seed: int) -> Path:
        """Where the prompt tuned on ``model`` is kept: keyed by everything that determines it."""
        cfg = self.config(task, init, seed, model)
        # the evaluation settings under the names the task config gave them when the cached prompts were tuned
        evaluation = {
            "eval_batch_size": cfg.eval.batch_size,
            "limit_val": cfg.eval.limit_val,
            "limit_test": cfg.eval.limit_test,
        }
        task_key = {**plain(cfg.task), **evaluation}
        recipe = {"model": model, "task": task_key, "prompt": plain(cfg.prompt), "steps": cfg.trainer.max_steps}
        return self.prompts / task / model / f"{init}-seed{seed}-{digest(recipe)}"

    def tuned(self, task: str, model: str, init: str, seed: int) -> tuple[SoftPrompt, float]:
        """The prompt tuned on ``model`` and its tuning time, from the cache or tuned now."""
        path = self.prompt_path(task, model, init, seed)
        if not (path / "tuned.json").exists():
            cfg = self.config(task, init, seed, model)
            side = self.model(model)
            log.info("Tuning %s / %s / %s / seed %d", task, model, init, seed)
            prompt, outcome = tune_prompt(cfg, side, data_module(side, task_spec(cfg.task), cfg), "bench")
            prompt.save(path)
            record = {"tune_seconds": outcome.seconds}
            if outcome.best_step is not None:
                record["bench"] = outcome.score
            (path / "tuned.json").write_text(json.dumps(record))  # "bench": the kept prompt's validation accuracy
        return SoftPrompt.load(path), json.loads((path / "tuned.json").read_text())["tune_seconds"]

    def retune_seconds(self, task: str, target: str, cached: float) -> float:
        """What re-tuning a prompt from scratch on ``target`` costs in this process, on this device
        and under this load, the yardstick of every cost ratio (``cached``, the tuning's own
        recorded time, was measured elsewhere: on another device, or beside other processes;
        ``--quick`` uses it, its recipe being shorter than the timing)."""
        return cached if self.args.quick else self._retune_cost(task, target)["seconds"]

    def retune_flops(self, task: str, target: str, cached: float) -> float:
        """The model compute of re-tuning from scratch on ``target`` (as :meth:`retune_seconds`, counted:
        the same on any device and under any load; ``cached``, the tuning's recorded FLOPs, for ``--quick``)."""
        return cached if self.args.quick else self._retune_cost(task, target)["flops"]

    def _retune_cost(self, task: str, target: str) -> dict[str, float]:
        """A tuning's fixed cost and the recipe's ``max_steps`` at the seconds (and FLOPs) per step,
        from two short tunings run here (the difference of their times is the steps' own: on a GPU a
        step is milliseconds and starting a trainer is seconds), plus its validations at the cost of
        one validation run here. Measured once per target and process."""
        if (task, target) not in self._retune:
            cfg = self.config(task, model=target)
            steps, every = cfg.trainer.max_steps, cfg.trainer.val_check_interval
            side = self.model(target)
            data = data_module(side, task_spec(cfg.task), cfg)
            data.setup("fit")
            prompt = torch.zeros(cfg.prompt.length, side.model.get_input_embeddings().weight.shape[1])
            start = time.perf_counter()
            with metered() as validation_compute:
                evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("validation",), 0)
                evaluator.accuracy(side, data, prompt, "timing")
            validation = time.perf_counter() - start
            seconds, flops = [], []
            for calibration in CALIBRATION_STEPS:
                short = cfg.copy()
                short.trainer.max_steps, short.trainer.limit_val_batches = calibration, 0
                _, outcome = tune_prompt(short, side, data, "timing")
                seconds.append(outcome.seconds)
                flops.append(outcome.compute.flops)
            (few, many), (t_few, t_many) = CALIBRATION_STEPS, seconds
            per_step = max(t_many - t_few, 0.0) / (many - few)
            fixed = max(t_few - few * per_step, 0.0)
            step_flops = flops[1] / many  # counted: no start-up cost to separate
            log.info("Re-tuning on %s here: %.1f s to start, %.3f s/step, %.1f s per validation; %.3g FLOPs/step, "
                     "%.3g per validation", target, fixed, per_step, validation, step_flops,
                     validation_compute.flops)  # fmt: skip
            self._retune[task, target] = {
                "seconds": fixed + steps * per_step + (steps // every) * validation,
                "flops": steps * step_flops + (steps // every) * validation_compute.flops,
            }
        return self._retune[task, target]

    def accuracy(self, task: str, model: str, prompt: torch.Tensor | None, seed: int = 0) -> float:
        cfg = self.config(task)
        key = f"acc|{task}|{model}|{digest(prompt) if prompt is not None else 'zero-shot'}|{digest(plain(cfg.task))}"

        def compute() -> float:
            side = self.model(model)
            evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("test",), 0, seed)
            return evaluator.accuracy(side, data_module(side, task_spec(cfg.task), cfg), prompt, "bench")["test"]

        return self.cache.value(key, compute)

    def baselines(self, task: str, model: str, length: int) -> tuple[float, float]:
        cfg = self.config(task)
        draws = cfg.eval.random_prompt_draws
        key = f"baselines|{task}|{model}|{length}|{draws}|{digest(plain(cfg.task))}"

        def compute() -> list[float]:
            side = self.model(model)
            evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("test",), draws, cfg.seed)
            result = evaluator.baselines(side, data_module(side, task_spec(cfg.task), cfg), length)
            return [result.zero_shot["test"], result.random_prompt["test"]]

        zero_shot, random_prompt = self.cache.value(key, compute)
        return zero_shot, random_prompt

    def rows(
        self,
        task: str,
        pairs: list[str],
        recyclers: list[str],
        inits: list[str],
        seeds: list[int],
        done: frozenset[tuple] = frozenset(),
    ) -> Iterable[dict]:
        """The rows of every cell not in ``done`` (keys as :func:`row_key`)."""
        anchors = self.config(task).anchors
        for pair in pairs:
            source, target = pair.split(":")
            src, tgt = self.model(source), self.model(target)
            objective = self.objective(task, source)
            for spec in recyclers:
                name, options, anchor_options, refine = parse_recycler(spec)
                if name == "identity" and (src.dim != tgt.dim or src.fingerprint != tgt.fingerprint):
                    continue  # identity needs the same embedding space
                key = (task, objective, source, target, spec)
                todo = [(i, n) for i in inits for n in seeds if (*key, i, n) not in done]
                if not todo:
                    continue
                start = time.perf_counter()
                recycler = fit_recycler(
                    get_recycler(name, **options), src.model, src.tokenizer, tgt.model, tgt.tokenizer,
                    **{"anchor_offset": anchors.offset, "anchor_size": anchors.size, **anchor_options},
                )  # fmt: skip
                fit_seconds = time.perf_counter() - start
                for init, seed in todo:
                    prompt, _ = self.tuned(task, source, init, seed)
                    retuned, tuned_seconds = self.tuned(task, target, init, seed)
                    retune_seconds = self.retune_seconds(task, target, tuned_seconds)
                    start = time.perf_counter()
                    recycled = recycler.transform(prompt)
                    if refine is not None:
                        trainer = instantiate(self.config(task, init, seed).trainer, _partial_=True)
                        outcome = distill(src, prompt, tgt, recycled.embeddings, refine, trainer, seed=seed)
                        recycled = refined(recycled, outcome, refine)
                    recycle_seconds = fit_seconds + time.perf_counter() - start
                    zero_shot, random_prompt = self.baselines(task, target, prompt.length)
                    recycled_acc = self.accuracy(task, target, recycled.embeddings)
                    yield {
                        "task": task, "objective": objective, "source": source, "target": target, "recycler": spec,
                        "init": init, "seed": seed, "recycled_acc": recycled_acc, "zero_shot_acc": zero_shot,
                        "random_prompt_acc": random_prompt,
                        "source_acc": self.accuracy(task, source, prompt.embeddings),
                        "retuned_acc": self.accuracy(task, target, retuned.embeddings),
                        "success": int(recycled_acc > max(zero_shot, random_prompt)),
                        "recycle_seconds": round(recycle_seconds, 4), "retune_seconds": round(retune_seconds, 2),
                        "device": self.device(task),
                    }  # fmt: skip

    def device(self, task: str) -> str:
        """What recycles and evaluates: the GPU's name, or ``cpu`` (timings compare only within one)."""
        on_gpu = self.config(task).trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.get_device_name() if on_gpu else "cpu"

    def untuned(self, tasks: list[str], pairs: list[str], inits: list[str], seeds: list[int]) -> list[tuple]:
        """(task, model, init, seed) of each prompt the cells need that the cache does not hold."""
        models = list(dict.fromkeys(m for pair in pairs for m in pair.split(":")))
        jobs = [(t, m, i, s) for t in tasks for m in models for i in inits for s in seeds]
        return [job for job in jobs if not (self.prompt_path(*job) / "tuned.json").exists()]


# ------------------------------------------------------------- worker processes (--workers)
_worker: Matrix | None = None


def _start_worker(args: argparse.Namespace) -> None:
    global _worker
    _worker = Matrix(args)


def _tune(job: tuple) -> tuple:
    _worker.tuned(*job)
    return job


def _cell(cell: tuple) -> list[dict]:
    """The rows of one task x pair x recycler."""
    task, pair, spec, inits, seeds, done = cell
    return list(_worker.rows(task, [pair], [spec], inits, seeds, done))


# ---------------------------------------------------------------------- report
def load_rows(path: Path) -> list[dict]:
    rows = read_rows(path)
    for row in rows:
        for key in ("recycled_acc", "zero_shot_acc", "random_prompt_acc", "source_acc", "retuned_acc"):
            row[key] = float(row[key])
        row["success"], row["seed"] = int(row["success"]), int(row["seed"])
        row["recycle_seconds"], row["retune_seconds"] = float(row["recycle_seconds"]), float(row["retune_seconds"])
    return rows


def row_key(row: dict) -> tuple:
    """What identifies a row: one recycled prompt of one tuning recipe."""
    return row["task"], row["objective"], row["source"], row["target"], row["recycler"], row["init"], row["seed"]


def tables(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(task, objective, rows) of each table, the paper's protocol first, the newer recipe first within a task."""
    present = {(r["task"], r["objective"]) for r in rows}
    order = [t for t in TASK_SETTINGS if any(t == task for task, _ in present)]
    order += sorted({task for task, _ in present} - set(TASK_SETTINGS))
    return [
        (task, objective, [r for r in rows if r["task"] == task and r["objective"] == objective])
        for task in order
        for objective in sorted((o for t, o in present if t == task), key=lambda o: (o != "classes", o))
    ]


def table_title(task: str, objective: str) -> str:
    """``SST2_PLAIN, prompts tuned on objective=classes``: the task and the recipe's objective."""
    return f"{task.upper()}, prompts tuned on objective={objective}"


def recovery(row: dict) -> float | None:
    """(recycled - best baseline) / (re-tuned - best baseline); None when re-tuning does not beat the baselines."""
    best = best_baseline(row)
    gap = row["retuned_acc"] - best
    return (row["recycled_acc"] - best) / gap if gap > 0 else None


def best_baseline(row: dict) -> float:
    return max(row["zero_shot_acc"], row["random_prompt_acc"])


def summarise(rows: list[dict]) -> dict:
    """Success rate (with its spread over seeds), recovery and cost for a group of rows."""
    by_seed, margin_by_seed = defaultdict(list), defaultdict(list)
    for row in rows:
        by_seed[row["seed"]].append(row["success"])
        margin_by_seed[row["seed"]].append(row["recycled_acc"] >= best_baseline(row) + MARGIN)
    seed_rates = [statistics.fmean(v) for v in by_seed.values()]
    recoveries = [r for r in map(recovery, rows) if r is not None]
    return {
        "n": len(rows),
        "success_rate": statistics.fmean(r["success"] for r in rows),
        "margin_rate": statistics.fmean(m for v in margin_by_seed.values() for m in v),
        "margin_seed_rates": [statistics.fmean(v) for v in margin_by_seed.values()],
        "seed_std": statistics.pstdev(seed_rates) if len(seed_rates) > 1 else 0.0,
        "recovery_mean": statistics.fmean(recoveries) if recoveries else float("nan"),
        "recovery_std": statistics.pstdev(recoveries) if len(recoveries) > 1 else 0.0,
        "recycled_acc": statistics.fmean(r["recycled_acc"] for r in rows),
        "cost_ratio": statistics.median(r["recycle_seconds"] / r["retune_seconds"] for r in rows),
    }


def canonical(rows: list[dict]) -> list[dict]:
    """Rows in the order of the tables: tasks, pairs, recyclers, inits as listed above (others after)."""
    orders = [list(TASK_SETTINGS), list(PAIRS), RECYCLERS, INITS]

    def rank(order: list[str], value: str) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)

    def key(row: dict) -> tuple:
        values = row["task"], f"{row['source']}:{row['target']}", row["recycler"], row["init"]
        return *(rank(order, value) for order, value in zip(orders, values, strict=True)), row["seed"]

    return sorted(rows, key=key)


def report(rows: list[dict], out_dir: Path) -> str:
    """One markdown table per task and recipe (success by recycler x pair), a heatmap PNG and a
    success-against-cost chart; returns the markdown. Per-prompt figures stay in the CSV."""
    lines = [
        f"Each cell: success with a margin (recycled ≥ best baseline + {MARGIN:.0%}), then in parentheses the"
        " paper's success (recycled > best baseline). The first row is the headroom: re-tuned − best baseline,"
        " in points, mean (min over prompts). Cost ratio: recycling's seconds over re-tuning's (median).",
        "",
    ]
    rows = canonical(rows)
    for task, objective, task_rows in tables(rows):
        pair_of = lambda r: f"{r['source']} → {r['target']}"  # noqa: E731
        pairs = list(dict.fromkeys(map(pair_of, task_rows)))
        recyclers = list(dict.fromkeys(r["recycler"] for r in task_rows))
        lines += [f"### {table_title(task, objective)}", ""]
        lines += [
            "| recycler | " + " | ".join(pairs) + " | all pairs | cost ratio |",
            "|---" * (len(pairs) + 3) + "|",
            "| _headroom_ | " + " | ".join(headroom([r for r in task_rows if pair_of(r) == p]) for p in pairs)
            + f" | {headroom(task_rows)} | |",
        ]  # fmt: skip
        for rec in recyclers:
            groups = [[r for r in task_rows if r["recycler"] == rec and pair_of(r) == pair] for pair in pairs]
            everything = summarise([r for r in task_rows if r["recycler"] == rec])
            cells = [rates(summarise(group)) if group else "—" for group in groups]
            lines.append(
                f"| {rec} | " + " | ".join(cells) + f" | {rates(everything)} | {everything['cost_ratio']:.2%} |"
            )
        lines.append("")
    heatmap(rows, out_dir / "recycling_matrix.png")
    tradeoff_chart(rows, out_dir / "success_vs_cost.png")
    return "\n".join(lines)


def headroom(rows: list[dict]) -> str:
    """Re-tuned minus best baseline in points, mean (min), counting each prompt (init, seed, target) once."""
    prompts = {(r["target"], r["init"], r["seed"]): r for r in rows}.values()
    gains = [100 * (r["retuned_acc"] - best_baseline(r)) for r in prompts]
    return f"{statistics.fmean(gains):+.1f} ({min(gains):+.1f})"


def rates(stats: dict) -> str:
    """``33% (44%)``: success with the margin, then the paper's success."""
    return f"{stats['margin_rate']:.0%} ({stats['success_rate']:.0%})"


def heatmap(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = lambda r: f"{r['task']} ({r['objective']})\n{r['source']}→{r['target']}"  # noqa: E731
    columns = list(dict.fromkeys(map(column, rows)))
    recyclers = list(dict.fromkeys(r["recycler"] for r in rows))
    grid = torch.full((len(recyclers), len(columns)), float("nan"))
    for i, rec in enumerate(recyclers):
        for j, col in enumerate(columns):
            group = [r for r in rows if r["recycler"] == rec and column(r) == col]
            if group:
                grid[i, j] = statistics.fmean(r["success"] for r in group)
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.5 * len(recyclers) + 2), layout="constrained")
    image = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(recyclers)), recyclers)
    for i in range(len(recyclers)):
        for j in range(len(columns)):
            if not torch.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, label="success rate (recycled > max(zero-shot, random prompt))")
    ax.set_title("Prompt recycling success rate")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: Tasks of the paper's protocol: the success-vs-cost chart's panels.
PAPER_TASKS = ("sst2_plain", "imdb_plain")


@dataclass(frozen=True)
class ChartPoint:
    """One method on a success-against-cost chart: ``cost`` (% of re-tuning), ``rate`` (% of prompts
    succeeding with the margin) and the span of that rate over some grouping (``low``, ``high``);
    ``method`` picks the colour and ``recipe`` the marker, so one method keeps its colour across recipes;
    ``cost_low``/``cost_high``, when given, the span of the cost over the same grouping."""

    label: str
    cost: float
    rate: float
    low: float
    high: float
    method: str = ""
    recipe: str = ""
    cost_low: float | None = None
    cost_high: float | None = None


def success_cost_chart(panels: dict[str, list[ChartPoint]], path: Path, title: str, xlabel: str, bars: str) -> None:
    """Success with a margin against compute, one point per method, a panel per key of ``panels``
    (its title): the chart of issue 15, drawn alike for the matrix's recyclers and the policy
    benchmark's policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return
    longest = max(len(points) for points in panels.values())
    columns = min(2, len(panels))  # two panels a row: a task's every pair and across seeds and sizes
    rows = -(-len(panels) // columns)
    size = (6.5 * columns, (5.0 + 0.22 * longest) * rows)  # room for a legend line per point
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    for unused in axes.flat[len(panels) :]:
        unused.set_visible(False)
    everything = [point for points in panels.values() for point in points]
    methods = list(dict.fromkeys(point.method or point.label for point in everything))
    recipes = list(dict.fromkeys(point.recipe for point in everything))
    cmap = plt.get_cmap("tab20")
    for ax, (task, points) in zip(axes.flat, panels.items(), strict=False):
        for point in points:
            cost = max(point.cost, 1e-3)
            yerr = [[point.rate - point.low], [point.high - point.rate]]
            xerr = None
            if point.cost_low is not None and point.cost_high is not None:
                xerr = [[cost - max(point.cost_low, 1e-3)], [max(point.cost_high, 1e-3) - cost]]
            colour = cmap(methods.index(point.method or point.label) % 20)
            marker = "osD^v"[recipes.index(point.recipe) % 5]
            ax.errorbar(cost, point.rate, yerr=yerr, xerr=xerr, fmt=marker, capsize=3, color=colour,
                        label=textwrap.fill(point.label, 90))  # fmt: skip
        ax.axvline(5, color="grey", linestyle=":", linewidth=1)
        ax.axhline(80, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(-5, 105)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"success with a margin, % (≥ best test baseline + {100 * MARGIN:.0f} points)")
        ax.set_title(f"{task}\nbars span {bars}", fontsize=9)
        ax.set_xlim(min(0.5, *(p.cost / 2 for p in points)), max(200, *(p.cost * 2 for p in points)))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.14), frameon=False)
    fig.suptitle(f"{title} (the aim: above and left of the dotted lines)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tradeoff_chart(rows: list[dict], path: Path) -> None:
    """Success with a margin against compute as a fraction of re-tuning, one point per recycler
    (and refinement budget), a panel per paper-protocol task; the bars span the seeds' rates."""
    panels = {}
    for task, objective, task_rows in tables(rows):
        if task not in PAPER_TASKS:
            continue
        points = panels.setdefault(task.upper(), [])
        for rec in dict.fromkeys(r["recycler"] for r in task_rows):
            group = [r for r in task_rows if r["recycler"] == rec]
            stats = summarise(group)
            rates = [100 * rate for rate in stats["margin_seed_rates"]]
            label = f"{rec}, prompts on objective={objective} (n={len(group)})"
            points.append(ChartPoint(label, 100 * stats["cost_ratio"], 100 * stats["margin_rate"], min(rates),
                                     max(rates), rec, objective))  # fmt: skip
    axis = "compute, % of re-tuning on the target (median of seconds; log scale)"
    success_cost_chart(panels, path, "Prompt recycling: success against cost", axis, "the seeds' rates")


def log_to_mlflow(rows: list[dict], csv_path: Path, png: Path, markdown: str) -> None:
    import mlflow

    with mlflow.start_run(run_name="recycling matrix"):
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(png))
        chart = png.with_name("success_vs_cost.png")
        if chart.exists():
            mlflow.log_artifact(str(chart))
        mlflow.log_text(markdown, "recycling_matrix.md")
        cells = defaultdict(list)
        for row in rows:
            cells[(row["task"], row["objective"], row["source"], row["target"], row["recycler"])].append(row)
        for (task, objective, source, target, rec), group in cells.items():
            with mlflow.start_run(run_name=f"{task} {source}->{target} {rec} ({objective})", nested=True):
                params = {"task": task, "objective": objective, "source": source, "target": target, "recycler": rec}
                mlflow.log_params(params)
                stats = summarise(group)
                mlflow.log_metrics({k: float(v) for k, v in stats.items() if v == v})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_SETTINGS), choices=list(TASK_SETTINGS))
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="source:target model names (conf/model)")
    parser.add_argument("--recyclers", nargs="+", default=RECYCLERS, help="name or name:key=value,...")
    parser.add_argument("--inits", nargs="+", default=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the CSV and PNG")
    parser.add_argument("--cache", default=str(ROOT / "bench" / "cache"), help="evaluations (and --quick's prompts)")
    parser.add_argument("--prompts", default=str(PROMPTS), help="tuned prompts (committed)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--recompute", action="store_true", help="recompute the selected cells (default: keep rows already in the CSV)"
    )
    parser.add_argument("--report-only", action="store_true", help="summarise the existing CSV")
    parser.add_argument("--mlflow", action="store_true", help="log the summary to MLflow (MLFLOW_TRACKING_URI)")
    parser.add_argument("--quick", action="store_true", help="one tiny cell: a smoke test")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="Hydra overrides of every tuning and evaluation (conf/config.yaml), e.g. trainer.accelerator=gpu",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1,
        help="processes that tune prompts and compute cells in parallel (one GPU takes ~12 for these models)",
    )  # fmt: skip
    parser.add_argument("--tune-only", action="store_true", help="tune and cache the prompts the cells need, then stop")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.pairs, args.recyclers = ["sst2_plain"], ["small-a-early:small-a"], ["identity", "linear"]
        args.inits, args.seeds = ["vocab"], [0]
    return args


def compute_rows(args: argparse.Namespace, csv_path: Path) -> None:
    """Tune the prompts the cells need and write the cells' rows; rows already in the CSV are kept.
    The CSV stays locked while it runs."""
    for spec in args.recyclers:  # a bad spec fails now, not hours into the run
        name, options, _, _ = parse_recycler(spec)
        get_recycler(name, **options)
    matrix = Matrix(args)
    if args.workers > 1 or args.tune_only:
        todo = matrix.untuned(args.tasks, args.pairs, args.inits, args.seeds)
        log.info("Tuning %d prompts in %d processes", len(todo), args.workers)
        for task, model, init, seed in in_processes(_tune, todo, args.workers, _start_worker, args):
            log.info("Tuned %s / %s / %s / seed %d", task, model, init, seed)
        if args.tune_only:
            return
    # rows already in the CSV are kept and not recomputed, unless --recompute names their cells
    previous = load_rows(csv_path) if csv_path.exists() else []
    cells = {(t, p, r) for t in args.tasks for p in args.pairs for r in args.recyclers} if args.recompute else set()
    redo = lambda r: (  # noqa: E731  a recomputed cell's rows of the current recipe (others are kept)
        (r["task"], f"{r['source']}:{r['target']}", r["recycler"]) in cells
        and r["objective"] == matrix.objective(r["task"], r["source"])
    )
    kept = [r for r in previous if not redo(r)]
    done = frozenset(map(row_key, kept))
    if args.workers > 1:
        cells = [
            (task, pair, spec, args.inits, args.seeds, done)
            for task in args.tasks for pair in args.pairs for spec in args.recyclers
        ]  # fmt: skip
        found = (row for rows in in_processes(_cell, cells, args.workers, _start_worker, args) for row in rows)
    else:
        found = (row for task in args.tasks for row in matrix.rows(task, args.pairs, args.recyclers,
                                                                     args.inits, args.seeds, done))  # fmt: skip
    for row in write_rows(csv_path, COLUMNS, kept, found):
        log.info(
            "%s %s->%s %s %s seed %d: %.3f (%s)",
            row["task"],
            row["source"],
            row["target"],
            row["recycler"],
            row["init"],
            row["seed"],
            row["recycled_acc"],
            "success" if row["success"] else "failure",
        )


def publish(args: argparse.Namespace, csv_path: Path, out: Path) -> None:
    """Print the summary of the CSV and write it into the docs (and MLflow where asked)."""
    rows = load_rows(csv_path)
    markdown = report(rows, out)
    print(markdown)
    if not args.quick:
        machine = bench_machine()
        shown = csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path
        note = (
            f"_Summary of the {len(rows)} rows of `{shown}`"
            f" (rows come from runs of `python bench/recycling_matrix.py`, which add the cells they are asked for),"
            f" written on {machine}; rows by the device that recycled and evaluated them: {rows_by_device(rows)}._"
        )
        update_section(Path(args.docs), "recycling-matrix", f"{note}\n\n{markdown}")
    if args.mlflow:
        log_to_mlflow(rows, csv_path, out / "recycling_matrix.png", markdown)


def main() -> None:
    args = parse_args()
    bench_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "recycling_matrix.csv"
    if not args.report_only:
        with lock_csv(csv_path, "recycling_matrix.py"):
            compute_rows(args, csv_path)
    if not args.tune_only:
        publish(args, csv_path, out)


if __name__ == "__main__":
    main()
