"""Warm start: tune on the target from the recycled prompt instead of from scratch.

When recycling alone is not enough, the recycled prompt can still save target compute as
the starting point of tuning. For each pair and seed, tune on the target twice with the
same recipe, from the recycled prompt and from the usual init, validating every
``--every`` steps, and report how many steps each needs to reach the scratch run's final
validation accuracy (the re-tuned level).

    python bench/warm_start.py                    # small-a -> small-b and small-a -> large, SST-2, 3 seeds
    python bench/warm_start.py --quick            # CI-sized smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from docs_update import bench_logging, bench_machine, update_section  # noqa: E402
from recycling_matrix import Matrix  # noqa: E402

from lightning_modules import PromptTuningModule  # noqa: E402
from mlflow_recycle.anchors import embedding_table  # noqa: E402
from mlflow_recycle.config import instantiate_partial  # noqa: E402
from mlflow_recycle.prompt_init import initial_prompt  # noqa: E402
from mlflow_recycle.recycle import fit_recycler  # noqa: E402
from mlflow_recycle.tuning import data_module, task_spec  # noqa: E402

log = logging.getLogger("bench.warm_start")


class Curve(L.Callback):
    """Validation accuracy after every validation run, by global step."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, module: PromptTuningModule) -> None:
        self.points.append((trainer.global_step, module.results["validation"]["accuracy"]))


def curve(
    matrix: Matrix, task: str, target: str, init: torch.Tensor, seed: int, steps: int, every: int
) -> list[tuple[int, float]]:
    cfg = matrix.config(task, "class_labels", seed)
    side = matrix.model(target)
    data = data_module(side, task_spec(cfg.task), cfg)
    optimizer = instantiate_partial(cfg.prompt.optimizer, "prompt.optimizer")
    module = PromptTuningModule(side.model, init, optimizer=optimizer)
    tracker = Curve()
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, val_check_interval=every, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker],
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.validate(module, datamodule=data, verbose=False)  # step 0: the starting point
    tracker.points = [(0, module.results["validation"]["accuracy"])]
    trainer.fit(module, datamodule=data)
    return tracker.points


def steps_to(points: list[tuple[int, float]], level: float) -> int | None:
    return next((step for step, accuracy in points if accuracy >= level), None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["small-a:small-b", "small-a:large"])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--recycler", default="linear")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--cache", default=str(ROOT / "bench" / "cache"))
    parser.add_argument("--mlflow", action="store_true", help="log the results to MLflow (MLFLOW_TRACKING_URI)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.seeds, args.steps, args.every = ["small-a-early:small-a"], [0], 4, 2
    return args


def pair_rows(matrix: Matrix, args: argparse.Namespace, pair: str) -> list[dict]:
    """For each seed: the recycled and the usual start on the target, and the steps each needs
    to reach the level tuning from the usual start ends on."""
    source, target = pair.split(":")
    src, tgt = matrix.model(source), matrix.model(target)
    recycler = fit_recycler(args.recycler, src.model, src.tokenizer, tgt.model, tgt.tokenizer)
    cfg = matrix.config(args.task)
    verbalizers = data_module(tgt, task_spec(cfg.task), cfg).encoder.verbalizer_ids
    rows = []
    for seed in args.seeds:
        prompt, _ = matrix.tuned(args.task, source, "class_labels", seed)
        scratch_init = initial_prompt(
            "class_labels", embedding_table(tgt.model), prompt.length, seed=seed,
            class_token_ids=verbalizers, exclude_ids=tgt.tokenizer.all_special_ids,
        )  # fmt: skip
        warm = curve(matrix, args.task, target, recycler.transform(prompt).embeddings, seed, args.steps, args.every)
        scratch = curve(matrix, args.task, target, scratch_init, seed, args.steps, args.every)
        level = scratch[-1][1]
        row = {
            "pair": f"{source} → {target}", "seed": seed, "level": level,
            "warm_start_acc": warm[0][1], "scratch_start_acc": scratch[0][1],
            "warm_steps": steps_to(warm, level), "scratch_steps": steps_to(scratch, level), "warm_final": warm[-1][1],
        }  # fmt: skip
        log.info("%s seed %d: %s", pair, seed, row)
        rows.append(row)
    return rows


def table(rows: list[dict], steps: int) -> str:
    """The rows as a markdown table, with the mean steps each start needed."""
    header = "| pair | seed | step 0: recycled / scratch "
    header += f"| steps to the {steps}-step scratch level | recycled after {steps} |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        warm_steps = r["warm_steps"] if r["warm_steps"] is not None else f">{steps}"
        start = f"{r['warm_start_acc']:.3f} / {r['scratch_start_acc']:.3f}"
        to_level = f"{warm_steps} vs {r['scratch_steps']} (level {r['level']:.3f})"
        lines.append(f"| {r['pair']} | {r['seed']} | {start} | {to_level} | {r['warm_final']:.3f} |")
    reached = [r["warm_steps"] for r in rows if r["warm_steps"] is not None]
    if reached:
        scratch = statistics.fmean(r["scratch_steps"] for r in rows)
        lines += ["", f"Recycled starts reached the scratch level in {statistics.fmean(reached):.0f} steps on average"]
        lines[-1] += f" ({len(reached)} of {len(rows)} runs), against {scratch:.0f} from scratch."
    return "\n".join(lines)


def log_to_mlflow(args: argparse.Namespace, rows: list[dict], markdown: str) -> None:
    import mlflow

    with mlflow.start_run(run_name="warm start"):
        mlflow.log_params({"task": args.task, "recycler": args.recycler, "steps": args.steps})
        mlflow.log_text(markdown, "warm_start.md")
        for r in rows:
            name = f"{r['pair'].replace(' → ', '_to_')}_seed{r['seed']}"
            steps = {"warm": r["warm_steps"], "scratch": r["scratch_steps"]}
            mlflow.log_metrics({f"{name}_{k}_steps": float(v) for k, v in steps.items() if v is not None})


def main() -> None:
    args = parse_args()
    bench_logging()
    matrix = Matrix(argparse.Namespace(quick=args.quick, cache=args.cache))
    rows = [row for pair in args.pairs for row in pair_rows(matrix, args, pair)]
    markdown = table(rows, args.steps)
    print(markdown)
    if not args.quick:
        command = "python bench/warm_start.py " + " ".join(sys.argv[1:])
        note = (
            f"_Generated by `{command.strip()}` on {bench_machine()}; validation accuracy on 500 validation examples._"
        )
        update_section(ROOT / "docs" / "benchmarks.md", "warm-start", f"{note}\n\n{markdown}")
    if args.mlflow:
        log_to_mlflow(args, rows, markdown)


if __name__ == "__main__":
    main()
