"""Migration under a policy: how many prompts work on the new base after each stage, and for what compute.

For each task, source -> target pair, prompt init and seed: the prompt tuned on the source
(the recycling matrix's cached prompts and recipe) goes through the migration policy
(``conf/policy/<policy>.yaml``, the migration's default unless ``--policy``) onto the
target. The gate decides on the target's validation split; test accuracy is measured for
the report only, next to a prompt re-tuned on the target from scratch with the same
recipe; the policy's wall time is compared with re-tuning's, timed in the same process
(:meth:`recycling_matrix.Matrix.retune_seconds`).

    python bench/migration_policy.py                              # every pair of the matrix (hours on a CPU)
    python bench/migration_policy.py --pairs small-a:small-b --seeds 0 1 2
    python bench/migration_policy.py --report-only
    python bench/migration_policy.py --quick --out /tmp/p         # CI smoke test
    python bench/migration_policy.py --workers 12 --set trainer.accelerator=gpu   # one GPU, a process per pair

Rows go to ``bench/results/migration_policy.csv`` (kept across runs: only missing rows
are computed), the summary to docs/benchmarks.md and, with ``--mlflow``, to one MLflow run.
A row's two long parts, the policy's run and tuning from scratch, are kept under
``bench/cache/migration_policy`` as each ends: a run killed between them resumes after the last.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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
from recycling_matrix import (  # noqa: E402
    CROSS_PAIRS,
    INITS,
    MARGIN,
    PAIRS,
    PAPER_TASKS,
    PROMPTS,
    TASK_SETTINGS,
    ChartPoint,
    Matrix,
    digest,
    success_cost_chart,
)

from mlflow_recycle.compute import metered  # noqa: E402
from mlflow_recycle.config import compose  # noqa: E402
from mlflow_recycle.policy import (  # noqa: E402
    Policy,
    Transfer,
    build_policy,
    build_transfer,
    initial_on_target,
    run_policy,
    tune_on_target,
)
from mlflow_recycle.prompt import SoftPrompt  # noqa: E402
from mlflow_recycle.tuning import data_module, task_spec  # noqa: E402

log = logging.getLogger("bench.policy")

COLUMNS = [
    "task", "objective", "source", "target", "policy", "init", "seed", "gate", "stage", "threshold", "gate_accuracy",
    "gate_gain_kept", "recycle_steps", "refine_steps", "retune_steps", "policy_seconds", "retune_seconds",
    "cost_fraction", "policy_flops", "retune_flops", "compute_fraction", "map_flops", "scratch_steps",
    "scratch_passed", "scratch_flops_to_gate", "scratch_ratio", "test_accuracy", "test_zero_shot",
    "test_random_prompt", "test_retuned", "test_source", "test_scratch", "n_test", "device",
]  # fmt: skip
NUMBERS = COLUMNS[COLUMNS.index("threshold") : COLUMNS.index("n_test") + 1]
STAGE_ORDER = ("recycle", "refine", "retune")
QUICK_POLICY = [
    "policy.stages.refine.steps=2",
    "policy.stages.refine.eval_every=1",
    "policy.stages.refine.texts=16",
    "policy.stages.refine.batch_size=4",
    "policy.stages.retune.steps=2",
    "policy.stages.retune.eval_every=1",
    "policy.stages.retune.batch_size=4",
    "policy.stages.retune.limit_train=16",
    "eval.limit_val=16",
    "eval.random_prompt_draws=1",
]


def policy_config(args: argparse.Namespace):
    overrides = [f"policy={args.policy}", "trainer.enable_progress_bar=false", *args.override]
    overrides += QUICK_POLICY if args.quick else []
    return compose(overrides, config_name="migrate")


def label(args: argparse.Namespace) -> str:
    """The policy and its overrides, as the rows name it."""
    return args.policy + (" " + " ".join(args.override) if args.override else "")


def rows(matrix: Matrix, args: argparse.Namespace, done: set[tuple]):
    for task in args.tasks:
        for pair in args.pairs:
            yield from pair_rows(matrix, args, task, pair, done)


def pair_rows(matrix: Matrix, args: argparse.Namespace, task: str, pair: str, done: set[tuple]):
    """The rows of one task and source -> target pair that ``done`` lacks."""
    cfg = policy_config(args)
    source, target = pair.split(":")
    objective = matrix.objective(task, source)  # what the source prompts are tuned on
    key = (task, objective, source, target, label(args))
    # seed by seed, so that the first rows written cover every init
    todo = [(i, s) for s in args.seeds for i in args.inits if (*key, i, s) not in done]
    if not todo:
        return
    job_cfg = matrix.config(task, model=target)
    policy = build_policy(cfg, job_cfg.source)  # re-tuning with the target's recipe, as a migration's
    spec = task_spec(job_cfg.task)  # this checkout's data and validation rule
    n_test = len(data_module(matrix.model(target), spec, job_cfg).dataset("test"))
    # the pair's prompts are the transfer's, as a migration's are every prompt it holds: a map trained on behaviour
    # learns from them and `enough_failing` counts them; each is read from the cache once
    counts = any(choice.needs_prompts for choice in policy.recycle.recyclers)
    held = [(i, s) for i in args.inits for s in args.seeds] if counts else todo
    cached = {(i, s): matrix.tuned(task, source, i, s) for i, s in held}
    sources = {key: (prompt.replace(task=spec), seconds) for key, (prompt, seconds) in cached.items()}
    prompts = [sources[key][0] for key in held] if counts else ()
    transfer = build_transfer(cfg, matrix.model(source), matrix.model(target), prompts=prompts)
    maps = [0.0, 0.0]  # the maps' seconds and FLOPs so far (fits on anchors; a training on behaviour)
    for init, seed in todo:  # each row written as soon as it is measured: a long run can stop at any prompt
        prompt, cached_seconds = sources[(init, seed)]
        transfer.seed = seed
        parts = parts_dir(matrix, args, cfg, task, source, target, init, seed)
        name = f"{task}/{source}/{init}/seed{seed}"
        outcome, maps, scratch = measured(policy, transfer, prompt, name, maps, parts, fresh=args.recompute)
        # the maps are shared by every prompt the pair holds: each row carries its share of what they cost so far
        shared_seconds, shared_flops = maps[0] / len(held), maps[1] / len(held)
        retuned = None if args.skip_retuned else matrix.tuned(task, target, init, seed)[0]
        retune_seconds = matrix.retune_seconds(task, target, cached_seconds)
        retune_flops = matrix.retune_flops(task, target, prompt.cost.get("flops", float("nan")))
        zero_shot, random_prompt = matrix.baselines(task, target, prompt.length)
        steps = {r.stage: r.steps for r in outcome.records}
        policy_flops = outcome.flops + shared_flops
        scratch_flops = scratch.flops if scratch.passed else retune_flops
        yield {
            "task": task, "objective": objective, "source": source, "target": target, "policy": label(args),
            "init": init, "seed": seed,
            "gate": outcome.gate, "stage": outcome.stage or "none",
            "threshold": round(outcome.threshold, 4), "gate_accuracy": round(outcome.score, 4),
            "gate_gain_kept": round(nan_if_none(outcome.gain_kept), 4),
            **{f"{s}_steps": steps.get(s, 0) for s in STAGE_ORDER},
            "policy_seconds": round(outcome.seconds + shared_seconds, 2), "retune_seconds": round(retune_seconds, 2),
            "cost_fraction": round((outcome.seconds + shared_seconds) / retune_seconds, 4),
            "policy_flops": policy_flops, "retune_flops": retune_flops,
            "compute_fraction": round(policy_flops / retune_flops, 4),
            "map_flops": outcome.map_flops,
            "scratch_steps": scratch.steps, "scratch_passed": float(scratch.passed),
            "scratch_flops_to_gate": scratch_flops,
            "scratch_ratio": round(scratch_flops / policy_flops, 4),
            "test_accuracy": matrix.accuracy(task, target, outcome.prompt.embeddings),
            "test_zero_shot": zero_shot, "test_random_prompt": random_prompt,
            "test_retuned": float("nan") if retuned is None else matrix.accuracy(task, target, retuned.embeddings),
            "test_source": matrix.accuracy(task, source, prompt.embeddings),
            "test_scratch": nan_if_none(scratch.prompt is not None and matrix.accuracy(task, target, scratch.prompt)),
            "n_test": n_test, "device": matrix.device(task),
        }  # fmt: skip


def parts_dir(matrix: Matrix, args, cfg, task: str, source: str, target: str, init: str, seed: int) -> Path:
    """Where one row's long parts are kept: keyed by the source prompt, the target's recipe and the policy."""
    prompts = [matrix.prompt_path(task, model, init, seed).name for model in (source, target)]
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("policy", "recycler", "anchors", "eval")}
    key = digest({"prompts": prompts, "policy": label(args), "settings": settings, "seed": cfg.seed})
    return Path(args.cache) / "migration_policy" / task / f"{source}-{target}" / f"{init}-seed{seed}-{key}"


def measured(
    policy: Policy, transfer: Transfer, prompt: SoftPrompt, name: str, maps: list[float], parts: Path, fresh: bool
):
    """The policy's outcome for ``prompt``, the maps' cost counted up to it, and tuning from scratch to
    its bar. Each part is kept under ``parts`` as it ends and read back by a later run unless ``fresh``
    (a resumed outcome comes with the maps' cost as its own run had counted it)."""
    resumed = None if fresh else load_part(parts / "policy.pt")
    if resumed is None:
        outcome = run_policy(policy, transfer, prompt, name)
        resumed = keep_part(
            parts / "policy.pt", (outcome, [maps[0] + outcome.map_seconds, maps[1] + outcome.map_flops])
        )
    outcome, maps = resumed
    scratch = None if fresh else load_part(parts / "scratch.pt")  # a dict: this script's classes pickle by name
    if scratch is None:
        scratch = keep_part(parts / "scratch.pt", asdict(scratch_to_gate(policy, transfer, prompt, outcome.score)))
    return outcome, maps, Scratch(**scratch)


def load_part(path: Path):
    if not path.exists():
        return None
    log.info("Resuming from %s", path)
    return torch.load(path, weights_only=False)


def keep_part(path: Path, value):
    """``value`` saved at ``path``, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(value, partial)
    partial.replace(path)
    return value


@dataclass
class Scratch:
    """Tuning from the usual init on the target with the policy's recipe, gate and early stop."""

    steps: int = 0
    flops: float = float("nan")
    passed: bool = False
    prompt: torch.Tensor | None = None


def scratch_to_gate(policy: Policy, transfer: Transfer, prompt: SoftPrompt, reached: float | None) -> Scratch:
    """The best alternative a user has: a fresh prompt tuned on the target (the source prompt's init, the
    transfer's seed) with the policy's recipe and early stop, until it passes the same bar; its compute
    counted. Where the re-tune stage goes on to a plateau, the bar is the migrated prompt's own validation
    score (``reached``) less one standard error: that score is the best of many checks, so a fresh prompt
    as good within noise counts as there."""
    stage = policy.stage("retune")
    judge = transfer.judge(policy.gate, prompt, None)
    if stage is None or judge.data is None:
        return Scratch()
    bar = judge.bar.threshold
    if not stage.stops_at_bar and reached is not None:
        noise = math.sqrt(reached * (1 - reached) / judge.baselines.examples[policy.gate.split])
        bar = max(judge.bar.floor, reached - noise)
    with metered() as used:
        fit = tune_on_target(stage, transfer, judge, prompt, initial_on_target(transfer, prompt), stop_above=bar)
    return Scratch(fit.steps, used.flops, fit.score is not None and fit.score > bar, fit.prompt)


def nan_if_none(value) -> float:
    return float("nan") if value is None or value is False else float(value)


_worker: tuple[Matrix, argparse.Namespace] | None = None


def _start_worker(matrix_args: argparse.Namespace, args: argparse.Namespace) -> None:
    global _worker
    _worker = Matrix(matrix_args), args


def _pair(work: tuple) -> list[dict]:
    task, pair, done = work
    matrix, args = _worker
    return list(pair_rows(matrix, args, task, pair, done))


# ---------------------------------------------------------------------- report
def load_rows(path: Path) -> list[dict]:
    out = read_rows(path)
    for row in out:
        for key in NUMBERS:  # rows from before a column was added: NaN (shown as "—")
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
        row["seed"] = int(row["seed"])
    return out


def row_key(row: dict) -> tuple:
    return row["task"], row["objective"], row["source"], row["target"], row["policy"], row["init"], row["seed"]


#: The presets, in the order the page shows them (conf/policy/<name>.yaml); other labels are variants tried.
PRESETS = ("default", "fast", "recycle")
#: What identifies one migrated prompt across policies: the same source prompt, target and device.
PROMPT_KEY = ("task", "objective", "source", "target", "init", "seed", "device")


def with_references(all_rows: list[dict]) -> list[dict]:
    """The rows, each with the re-tuned reference of its prompt (``--skip-retuned`` rows take another
    row's measurement of the same prompt pair: the same re-tuned prompt, cached)."""
    retuned = {}
    for row in all_rows:
        if row["test_retuned"] == row["test_retuned"]:
            retuned.setdefault(tuple(row[k] for k in PROMPT_KEY[:-1]), row["test_retuned"])
    return [
        {**r, "test_retuned": retuned.get(tuple(r[k] for k in PROMPT_KEY[:-1]), r["test_retuned"])} for r in all_rows
    ]


def gain_kept(row: dict, accuracy: str = "test_accuracy") -> float:
    """The share of the re-tuned prompt's gain over the best test baseline that ``accuracy`` keeps."""
    best = _test_baseline(row)
    headroom = row["test_retuned"] - best
    return (row[accuracy] - best) / headroom if headroom > 0 else float("nan")


def report(all_rows: list[dict]) -> str:
    """Per preset, task and pair: verdicts, the gain kept, and the compute against re-tuning and scratch."""
    rows_ = [r for r in with_references(all_rows) if r["policy"] in PRESETS]
    lines = [
        "Per pair, over its prompts (3 inits x up to 3 seeds): the verdicts on validation; the gain kept on test,",
        "(migrated - best baseline) / (re-tuned - best baseline), median and minimum; the migration's compute",
        "against one full re-tuning (median, counted FLOPs); and **scratch / policy**: the compute of tuning a fresh",
        "prompt on the new base to the same bar with the same recipe and early stop (a full re-tuning where it",
        "never gets there), over the migration's (median; above 1: recycling saves compute). Where the policy",
        "re-tunes to a plateau, the bar is the migrated prompt's validation score less one standard error. Test",
        "accuracy is the mean of the migrated prompts, of the scratch prompts and of the re-tuned ones.",
        "",
        "| task | policy | pair | prompts | passed / degraded / failed | gain kept (median, min) "
        "| compute vs re-tuning | scratch / policy | scratch passed | test: migrated / scratch / re-tuned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = _groups(rows_, ("task", "objective", "policy", "source", "target"))
    order = sorted(groups, key=lambda k: (k[0], k[1], PRESETS.index(k[2]), k[3], k[4]))
    for task, objective, label, source, target in order:
        group = groups[(task, objective, label, source, target)]
        verdicts = " / ".join(str(sum(r["gate"] == v for r in group)) for v in ("passed", "degraded", "failed"))
        kept = [k for k in map(gain_kept, group) if k == k]
        kept_text = f"{statistics.median(kept):.2f}, {min(kept):.2f}" if kept else "—"
        scratch = [r for r in group if r.get("scratch_ratio") == r.get("scratch_ratio") and "scratch_ratio" in r]
        ratio = f"{statistics.median(r['scratch_ratio'] for r in scratch):.2f}" if scratch else "—"
        passed = f"{sum(r['scratch_passed'] == 1 for r in scratch)} of {len(scratch)}" if scratch else "—"
        tests = [statistics.fmean(r[k] for r in group) if all(r[k] == r[k] for r in group) else float("nan")
                 for k in ("test_accuracy", "test_scratch", "test_retuned")]  # fmt: skip
        shown = " / ".join("—" if t != t else f"{t:.3f}" for t in tests)
        lines.append(
            f"| {task} ({objective}) | `{label}` | {source} → {target} | {len(group)} | {verdicts} | {kept_text}"
            f" | {_compute(group)} | {ratio} | {passed} | {shown} |"
        )
    return "\n".join(lines + [""])


def compared(all_rows: list[dict]) -> str:
    """Policies run on the same prompts, side by side: per task and pair, over the prompts that every
    policy run on that pair has (same init, seed and device), how each got through and what it cost."""
    by_prompt = _groups(all_rows, PROMPT_KEY)
    lines = []
    pairs = _groups(all_rows, PROMPT_KEY[:4])
    for (task, objective, source, target), group in sorted(pairs.items()):
        labels = sorted({r["policy"] for r in group})
        shared = [
            {r["policy"]: r for r in rows_}
            for key, rows_ in sorted(by_prompt.items())
            if key[:4] == (task, objective, source, target) and {r["policy"] for r in rows_} >= set(labels)
        ]
        if len(labels) < 2 or not shared:
            continue
        if not lines:
            lines += [
                "### Policies compared on the same prompts",
                "",
                "Where the CSV holds several policies for the same source prompts (same recipe, pair, init, seed",
                "and device): how many pass the gate at each stage, how many of those also beat the best baseline on",
                "test, the migrated prompts' test accuracy (mean), cost against re-tuning (median; seconds, and",
                "compute in FLOPs) and the optimiser steps the policy took (median; a full re-tuning takes the",
                "recipe's 800): seconds carry the machine's load, FLOPs and steps do not, and a step on longer",
                "inputs computes more.",
                "",
                "| task | prompts tuned on | pair | policy | prompts | passed at recycle / refine / retune "
                "| passed and above the test baseline | test: migrated | cost (median) | compute (median) "
                "| steps (median) |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
        for label in labels:
            rows_ = [prompt[label] for prompt in shared]
            stages = " / ".join(str(sum(r["stage"] == stage for r in rows_)) for stage in STAGE_ORDER)
            passed, works = _passed_and_working(rows_)
            test = statistics.fmean(r["test_accuracy"] for r in rows_)
            cost = statistics.median(r["cost_fraction"] for r in rows_)
            steps = statistics.median(sum(r[f"{stage}_steps"] for stage in STAGE_ORDER) for r in rows_)
            lines.append(
                f"| {task} | objective={objective} | {source} → {target} | `{label}` | {len(rows_)} | {stages}"
                f" | {works} of {len(passed)}"
                f" | {test:.3f} | {cost:.0%} | {_compute(rows_)} | {steps:.0f} |"
            )
    return "\n".join(lines + ([""] if lines else []))


def chart_points(all_rows: list[dict]) -> dict[str, list[ChartPoint]]:
    """Issue 15's chart for the policies: the share of prompts whose migrated prompt beats the best
    test baseline by the matrix's margin, against the median compute (counted FLOPs) as a share of
    re-tuning, one point per policy with counted rows. Per paper-protocol task, a panel over every
    pair (the bars span the pairs' rates) and one over the pairs across seeds and sizes, the issue's
    criterion (the bars span the seeds' rates and median compute)."""
    panels = {}
    all_rows = [r for r in all_rows if r["policy"] in PRESETS]  # a few series a person can tell apart
    for task in (t for t in PAPER_TASKS if any(r["task"] == t for r in all_rows)):
        task_rows = [r for r in all_rows if r["task"] == task]
        across = [r for r in task_rows if f"{r['source']}:{r['target']}" in CROSS_PAIRS]
        for title, rows_, by in (
            (f"{task.upper()}, every pair", task_rows, ("source", "target")),
            (f"{task.upper()}, across seeds and sizes", across, ("seed",)),
        ):
            points = [_chart_point(objective, policy, counted, by)
                      for (objective, policy), group in _groups(rows_, ("objective", "policy")).items()
                      if (counted := _counted(group))]  # fmt: skip
            if points:
                panels[title] = points
    return panels


def _chart_point(objective: str, policy: str, counted: list[dict], by: tuple[str, ...]) -> ChartPoint:
    """One policy's point: its rate and median compute, with their spans over the groups ``by``."""
    groups = list(_groups(counted, by).values())
    rates = [100 * _working_share(rows_) for rows_ in groups]
    costs = [100 * statistics.median(r["compute_fraction"] for r in rows_) for rows_ in groups]
    short = policy.replace("policy.stages.", "stage ").replace("policy.", "")
    label_ = f"{short}, prompts on objective={objective} (n={len(counted)})"
    cost = 100 * statistics.median(r["compute_fraction"] for r in counted)
    spread = {"cost_low": min(costs), "cost_high": max(costs)} if by == ("seed",) else {}
    return ChartPoint(label_, cost, 100 * _working_share(counted), min(rates), max(rates), policy, objective, **spread)


def _working_share(rows_: list[dict]) -> float:
    """The share of migrated prompts that beat the best test baseline by the matrix's margin."""
    return statistics.fmean(r["test_accuracy"] >= _test_baseline(r) + MARGIN for r in rows_)


def _counted(rows_: list[dict]) -> list[dict]:
    """The rows that counted their compute (rows from before 2026-12-04 hold NaN)."""
    return [r for r in rows_ if r["compute_fraction"] == r["compute_fraction"]]


def _compute(rows_: list[dict]) -> str:
    """The median compute fraction over the rows that counted it."""
    counted = [r["compute_fraction"] for r in _counted(rows_)]
    return _shown(statistics.median(counted) if counted else None, len(counted), len(rows_), ".0%")


def _test_baseline(row: dict) -> float:
    return max(row["test_zero_shot"], row["test_random_prompt"])


def _passed_and_working(rows_: list[dict]) -> tuple[list[dict], int]:
    """The rows that passed the gate (decided on validation), and how many of them beat the best
    baseline on test: does "passed" mean "works"?"""
    passed = [r for r in rows_ if r["gate"] == "passed"]
    return passed, sum(r["test_accuracy"] > _test_baseline(r) for r in passed)


def _shown(value: float | None, have: int, rows_: int, spec: str) -> str:
    """A value over the rows that have it, saying how many do when not all (--skip-retuned)."""
    if not have:
        return "—"
    return f"{value:{spec}}" + (f" ({have} of {rows_})" if have < rows_ else "")


def _groups(rows_: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows_:
        groups[tuple(row[k] for k in keys)].append(row)
    return dict(groups)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks", nargs="+", default=list(TASK_SETTINGS), choices=list(TASK_SETTINGS),
        help="the matrix's tasks: the paper's protocol (*_plain) first, then the cue protocol",
    )  # fmt: skip
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="source:target model names (conf/model)")
    parser.add_argument("--inits", nargs="+", default=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policy", default="default", help="a conf/policy entry")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of conf/migrate.yaml")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--cache", default=str(ROOT / "bench" / "cache"), help="evaluations (and --quick's prompts)")
    parser.add_argument("--prompts", default=str(PROMPTS), help="the matrix's tuned prompts (committed)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--recompute", action="store_true", help="compute the selected rows again (default: keep rows the CSV has)"
    )
    parser.add_argument("--mlflow", action="store_true", help="log the rows and summary to MLflow")
    parser.add_argument("--quick", action="store_true", help="one tiny prompt: a smoke test")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="Hydra overrides of the tuning and evaluation (conf/config.yaml, as the matrix's --set)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes, one pair at a time each")
    parser.add_argument(
        "--skip-retuned", action="store_true",
        help="do not tune the reference prompt from scratch on the target (its columns stay empty): for a target "
        "whose 800-step tuning takes long on this machine; the cost ratio is still timed",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.pairs, args.inits, args.seeds = ["sst2"], ["small-a-early:small-a"], ["vocab"], [0]
    return args


def compute_rows(args: argparse.Namespace, csv_path: Path) -> None:
    """Migrate the prompts asked for and write their rows; rows the CSV has are kept, unless
    --recompute asks for them again. The CSV stays locked while it runs."""
    kept = load_rows(csv_path) if csv_path.exists() else []
    matrix_args = argparse.Namespace(cache=args.cache, prompts=args.prompts, quick=args.quick, set=args.set)
    if args.recompute:  # the rows asked for are computed again, replacing the ones kept
        matrix = Matrix(matrix_args)
        asked = {(t, matrix.objective(t, p.split(":")[0]), *p.split(":"), label(args), i, s)
                 for t in args.tasks for p in args.pairs for i in args.inits for s in args.seeds}  # fmt: skip
        kept = [row for row in kept if row_key(row) not in asked]
    done = set(map(row_key, kept))
    if args.workers > 1:
        pairs = [(task, pair, done) for task in args.tasks for pair in args.pairs]
        found = (row for rows_ in in_processes(_pair, pairs, args.workers, _start_worker, matrix_args, args)
                 for row in rows_)  # fmt: skip
    else:
        found = rows(Matrix(matrix_args), args, done)
    for row in write_rows(csv_path, COLUMNS, kept, found):
        log.info("%s %s->%s %s seed %d: %s at %s, %.0f%% of re-tuning", row["task"], row["source"],
                 row["target"], row["init"], row["seed"], row["gate"], row["stage"],
                 100 * row["cost_fraction"])  # fmt: skip


def publish(args: argparse.Namespace, csv_path: Path, out: Path) -> None:
    """The chart, the summary printed and written into the docs (and MLflow where asked)."""
    all_rows = load_rows(csv_path)
    axis = "compute, % of re-tuning's FLOPs on the target (median; log scale)"
    title = "Migration policies: success against compute"
    success_cost_chart(chart_points(all_rows), out / "migration_policy.png", title, axis, "the pairs' or seeds' values")
    markdown = "\n".join(filter(None, (report(all_rows), compared([r for r in all_rows if r["policy"] in PRESETS]))))
    print(markdown)
    if not args.quick:
        shown = csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path
        note = (
            f"_Summary of `{shown}` (`python bench/migration_policy.py`), written on {bench_machine()}; rows by the"
            f" device that ran them (seconds and cost compare only within one): {rows_by_device(all_rows)}._"
        )
        update_section(Path(args.docs), "migration-policy", f"{note}\n\n{markdown}")
    if args.mlflow:
        import mlflow

        with mlflow.start_run(run_name="migration policy"):
            mlflow.log_artifact(str(csv_path))
            if (out / "migration_policy.png").exists():
                mlflow.log_artifact(str(out / "migration_policy.png"))
            mlflow.log_text(markdown, "migration_policy.md")


def main() -> None:
    args = parse_args()
    bench_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "migration_policy.csv"
    if not args.report_only:
        Policy.from_config(policy_config(args).policy)  # a bad policy fails before any tuning
        with lock_csv(csv_path, "migration_policy.py"):
            compute_rows(args, csv_path)
    publish(args, csv_path, out)


if __name__ == "__main__":
    main()
