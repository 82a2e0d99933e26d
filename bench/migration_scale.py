"""Migration at scale: a base version with many prompts, through a real server and the real receiver.

Starts a real ``mlflow server`` (SQLite, webhooks on) and the real receiver (``hook serve``), ties N
prompts to base version 1, registers version 2, and times from ``create_model_version`` to the
receiver's job done, for each N and mode:

- ``no_eval``: every prompt recycled by the map and registered ``unevaluated``;
- ``gate``: the paper's recycling judged by the gate on 64 SST-2 validation examples, with the test
  report on 64 test examples (``policy=recycle``).

In the same run it measures the floor (one prompt's bookkeeping at its least: a run, a 20 x d prompt
uploaded, a registered version, through the same server), the receiver's memory (RSS growth over the
job), and prompts batched through one frozen model against one at a time (K = 8): the gate's scoring
(``eval.prompts_per_pass``) and re-tuning (``fit_prompts``), as throughput ratios.

    python bench/migration_scale.py                       # N = 10, 100 both modes, 1000 without evaluation
    python bench/migration_scale.py --no-eval 10 100 1000 --gate 10 100
    python bench/migration_scale.py --quick               # CI: N = 2 without evaluation, K = 2, few steps

Rows go to ``bench/results/migration_scale.csv``; the section in docs/benchmarks.md is regenerated.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
from docs_update import bench_logging, bench_machine, update_section  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lightning_modules import PromptTuningModule, StackedPromptTuningModule, adamw, fit_prompt, fit_prompts  # noqa: E402
from mlflow_recycle import SoftPrompt, TaskSpec  # noqa: E402
from mlflow_recycle.evaluation import Evaluator, task_data  # noqa: E402
from mlflow_recycle.models import LoadedModel, load_pretrained  # noqa: E402
from mlflow_recycle.registry import log_prompt, prompts_for, register_base_model, tie  # noqa: E402
from tests import servers as local  # noqa: E402

SECRET = "scale-benchmark"
V1, V2 = ROOT / "assets" / "models" / "small-a", ROOT / "assets" / "models" / "small-a-early"
EVAL_EXAMPLES = 64
COLUMNS = ["mode", "prompts", "seconds", "seconds_per_prompt", "floor_seconds_per_prompt", "ratio_to_floor",
           "rss_start_mb", "rss_growth_mb", "machine"]  # fmt: skip
MODES = {
    "no_eval": ["evaluate=false"],
    "gate": ["policy=recycle", f"eval.limit_val={EVAL_EXAMPLES}", f"eval.limit_test={EVAL_EXAMPLES}"],
}
TASK = TaskSpec(
    "sst2", "{text} This movie is", (" bad", " great"), data=str(ROOT / "assets" / "data" / "sst2"), max_length=96
)

log = logging.getLogger("bench.scale")


# ---------------------------------------------------------------------- the floor
def floor_seconds(n: int, dim: int) -> float:
    """Seconds of one prompt's bookkeeping at its least, the median of ``n``: a run, a 20 x dim tensor
    uploaded as its artifact, and a version of a registered model made from it."""
    client, name, times = MlflowClient(), "floor-prompt", []
    client.create_registered_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompt.pt"
        torch.save(torch.randn(20, dim), path)
        for _ in range(n):
            start = time.perf_counter()
            with mlflow.start_run(run_name="floor") as run:
                mlflow.log_artifact(str(path), "prompt")
            client.create_model_version(name, f"runs:/{run.info.run_id}/prompt", run.info.run_id)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------- a migration through the receiver
def prompts_on_v1(base_model: str, n: int, workers: int = 8) -> None:
    """Base version 1 with ``n`` registered prompts of SST-2 (so they can be judged), uploaded side by side."""
    v1 = register_base_model(str(V1), base_model)
    model, _ = load_pretrained(str(V1))
    rows = model.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(0)
    fingerprint = v1.tags["mlflow_recycle.tokenizer_fingerprint"]
    prompts = [rows[torch.randint(1000, 5000, (20,), generator=generator)] * 2 for _ in range(n)]

    def register(i: int) -> None:
        prompt = SoftPrompt(prompts[i], tokenizer_fingerprint=fingerprint, task=TASK)
        log_prompt(tie(prompt, v1), "prompt", f"{base_model}-prompt-{i}")

    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(register, range(n)), total=n, desc=f"{n} prompts on {base_model} v1", leave=False))


def migrate_through_receiver(server: local.TrackingServer, root: Path, mode: str, n: int) -> dict:
    """One migration of ``n`` prompts: seconds from registering v2 to the job done, and the receiver's RSS."""
    base_model = f"scale-{mode}-{n}"
    overrides = [f"hook.watch=[{base_model}]", "hook.poll_seconds=0.1", *MODES[mode]]
    receiver = local.Receiver(server.url, root / base_model, SECRET, overrides).start()
    webhook = receiver.install_webhook()
    try:
        prompts_on_v1(base_model, n)
        model, tokenizer = load_pretrained(str(V2), dtype=None)
        with mlflow.start_run(run_name=f"upload {base_model} v2"):
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="base",
                task="text-generation",
                pip_requirements=["torch"],
            )
        rss_start = peak = receiver.rss_bytes()
        start = time.perf_counter()  # the upload is not part of the migration: from create_model_version
        mlflow.register_model(info.model_uri, base_model)

        def done() -> bool:
            nonlocal peak
            peak = max(peak, receiver.rss_bytes())
            jobs = [j for j in receiver.queue().jobs() if j.base_model == base_model]
            if any(j.status == "failed" for j in jobs):
                raise RuntimeError(f"the migration failed: {jobs[-1].error}")
            return bool(jobs) and all(j.status == "done" for j in jobs)

        receiver.wait_while_working(done, f"{n} migrated prompts", base_model, "2", ceiling=600 + 30 * n)
        seconds = time.perf_counter() - start
        migrated = len(prompts_for(base_model, 2))
        if migrated != n:
            raise RuntimeError(f"{migrated} prompts on {base_model} v2, expected {n}")
    finally:
        receiver.stop()
        for hook in [w for w in MlflowClient().list_webhooks() if w.name == webhook]:
            MlflowClient().delete_webhook(hook.webhook_id)
    mb = 1024 * 1024
    return {"mode": mode, "prompts": n, "seconds": seconds, "seconds_per_prompt": seconds / n,
            "rss_start_mb": rss_start / mb, "rss_growth_mb": (peak - rss_start) / mb}  # fmt: skip


# ---------------------------------------------------------------------- batched against one at a time
def batched_timings(k: int, steps: int) -> dict[str, float]:
    """Throughput of K prompts through one frozen model in one pass, over K passes of one prompt, in this
    process: the gate's scoring (64 validation examples) and re-tuning (``steps`` steps, a check every half)."""
    model, tokenizer = load_pretrained(str(V1))
    side = LoadedModel("small-a", str(V1), model, tokenizer)
    table = model.get_input_embeddings().weight.detach()
    prompts = [table[torch.randint(1000, 5000, (20,), generator=torch.Generator().manual_seed(i))] for i in range(k)]
    data = task_data(side, TASK, prompt_length=20, limit_val=EVAL_EXAMPLES, limit_train=256, seed=0, batch_size=16)
    trainer = _trainer_factory()
    timings = {}
    for label, per_pass in (("alone", 1), ("batched", k)):
        start = time.perf_counter()
        Evaluator(trainer, ("validation",), prompts_per_pass=per_pass).reports(side, data, prompts, "bench")
        timings[f"scoring_{label}"] = time.perf_counter() - start
    start = time.perf_counter()
    for prompt in prompts:
        L.seed_everything(0, verbose=False)
        fit_prompt(PromptTuningModule(model, prompt, optimizer=adamw(0.3), objective="classes"), trainer, steps=steps,
                   eval_every=max(steps // 2, 1), datamodule=data)  # fmt: skip
    timings["retune_alone"] = time.perf_counter() - start
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    fit_prompts(StackedPromptTuningModule(model, torch.stack(prompts), optimizer=adamw(0.3), objective="classes"),
                trainer, steps=steps, eval_every=max(steps // 2, 1), datamodule=data)  # fmt: skip
    timings["retune_batched"] = time.perf_counter() - start
    return timings


def _trainer_factory():
    from functools import partial

    return partial(L.Trainer, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip


# ---------------------------------------------------------------------- report
def report(rows: list[dict], ratios: dict[str, float], k: int, steps: int) -> str:
    lines = ["| mode | prompts | seconds | per prompt (s) | floor per prompt (s) | × floor | RSS growth (MB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [r["mode"], r["prompts"], f"{r['seconds']:.1f}", f"{r['seconds_per_prompt']:.3f}"]
        cells += [f"{r['floor_seconds_per_prompt']:.3f}", f"{r['ratio_to_floor']:.1f}", f"{r['rss_growth_mb']:.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"Prompts batched through one frozen model, K = {k}, against one at a time (same process):", "",
              "| work | one at a time (s) | batched (s) | throughput ratio |", "|---|---|---|---|"]  # fmt: skip
    for work, key in ((f"gate scoring, {EVAL_EXAMPLES} examples", "scoring"), (f"re-tuning, {steps} steps", "retune")):
        alone, batched = ratios[f"{key}_alone"], ratios[f"{key}_batched"]
        lines.append(f"| {work} | {alone:.2f} | {batched:.2f} | {alone / batched:.2f}× |")
    return "\n".join(lines)


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of ``path`` (if any) with this run's ``rows`` in place of the same (mode, prompts), in order."""
    earlier = list(csv.DictReader(path.open())) if path.exists() else []
    numeric = [c for c in COLUMNS if c not in ("mode", "machine")]
    kept = {(r["mode"], int(r["prompts"])): {**r, **{c: float(r[c]) for c in numeric}} for r in earlier}
    kept.update({(r["mode"], r["prompts"]): r for r in rows})
    for row in kept.values():
        row["prompts"] = int(row["prompts"])
    return sorted(kept.values(), key=lambda r: (list(MODES).index(r["mode"]), r["prompts"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--no-eval", nargs="*", type=int, default=[10, 100, 1000], help="prompt counts without evaluation"
    )
    parser.add_argument("--gate", nargs="*", type=int, default=[10, 100], help="prompt counts with the 64-example gate")
    parser.add_argument("--k", type=int, default=8, help="prompts per pass in the batched comparison")
    parser.add_argument("--steps", type=int, default=20, help="re-tuning steps in the batched comparison")
    parser.add_argument("--quick", action="store_true", help="N = 2 without evaluation, K = 2, 4 steps: a smoke test")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.quick:
        args.no_eval, args.gate, args.k, args.steps = [2], [], 2, 4
    bench_logging()
    for noisy in ("urllib3", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    machine = bench_machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = local.TrackingServer(Path(tmp) / "server").start()
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("migration-scale")
        try:
            floor = floor_seconds(5 if args.quick else 20, load_pretrained(str(V1))[0].config.hidden_size)
            log.info("floor: %.3f s per prompt", floor)
            for mode, counts in (("no_eval", args.no_eval), ("gate", args.gate)):
                for n in counts:
                    row = migrate_through_receiver(server, Path(tmp), mode, n)
                    row.update(
                        floor_seconds_per_prompt=floor,
                        ratio_to_floor=row["seconds_per_prompt"] / floor,
                        machine=machine,
                    )
                    log.info(
                        "%s, %d prompts: %.1f s, %.3f s per prompt", mode, n, row["seconds"], row["seconds_per_prompt"]
                    )
                    rows.append(row)
        finally:
            server.stop()
    ratios = batched_timings(args.k, args.steps)
    out = Path(args.out) / "migration_scale.csv"
    if not args.quick:  # this run's rows replace the same (mode, prompts) rows of earlier runs
        rows = merged(out, rows)
    markdown = report(rows, ratios, args.k, args.steps)
    print(markdown)
    if args.quick:
        return
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    command = "python bench/migration_scale.py " + " ".join(sys.argv[1:])
    kept = "rows this run did not measure are kept from earlier runs, each with its own run's floor"
    update_section(
        Path(args.docs), "migration-scale", f"_Generated by `{command.strip()}` on {machine}; {kept}._\n\n{markdown}"
    )


if __name__ == "__main__":
    main()
