"""Migration latency and scale: from a new base-model version to every prompt recycled.

Starts a real ``mlflow server`` (SQLite, webhooks on) and the real receiver, ties N prompts
to base version 1, then registers version 2 and times from the ``create_model_version``
call to the last recycled prompt version appearing in the registry, for N = 1, 10, 100,
with evaluation on a fixed small evaluation set and without. The recycler is fitted once
per migration, so the time should grow as a + b·N; the fit (a) and per-prompt cost (b)
are reported.

    python bench/migration_latency.py            # N = 1, 10, 100; with and without evaluation
    python bench/migration_latency.py --quick    # CI smoke test: N = 1, 2 without evaluation
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import mlflow  # noqa: E402
import torch  # noqa: E402
from docs_update import bench_machine, update_section  # noqa: E402

from mlflow_recycle import SoftPrompt, TaskSpec  # noqa: E402
from mlflow_recycle.models import load_pretrained  # noqa: E402
from mlflow_recycle.registry import log_prompt, prompts_for, register_base_model, tie  # noqa: E402
from tests import servers as local  # noqa: E402

SECRET = "latency-benchmark"
SHARED = Path(os.environ.get("MLFLOW_RECYCLE_SHARED", ROOT.parent / "shared"))
V1, V2 = ROOT / "assets" / "models" / "small-a", ROOT / "assets" / "models" / "small-a-early"
EVAL_EXAMPLES = 64

log = logging.getLogger("bench.latency")


def prompts_on_v1(base_model: str, n: int) -> None:
    """Base version 1 with ``n`` registered prompts (SST-2 task, so they can be evaluated)."""
    v1 = register_base_model(str(V1), base_model)
    model, _ = load_pretrained(str(V1))
    rows = model.get_input_embeddings().weight.detach()
    task = TaskSpec(
        "sst2", "{text} This movie is", (" bad", " great"), data=str(ROOT / "assets" / "data" / "sst2"), max_length=96
    )
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        picked = rows[torch.randint(1000, 5000, (20,), generator=generator)] * 2
        prompt = SoftPrompt(picked, tokenizer_fingerprint=v1.tags["mlflow_recycle.tokenizer_fingerprint"], task=task)
        log_prompt(tie(prompt, v1), "prompt", f"{base_model}-prompt-{i}")


def time_migration(base_model: str, n: int, timeout: float) -> float:
    """Seconds from creating base version 2 to ``n`` recycled prompt versions tied to it."""
    model, tokenizer = load_pretrained(str(V2), dtype=None)
    with mlflow.start_run(run_name=f"upload {base_model} v2"):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name="base", task="text-generation", pip_requirements=["torch"]
        )
    start = time.perf_counter()  # the upload is not part of the migration: start at create_model_version
    mlflow.register_model(info.model_uri, base_model)
    local.wait_until(lambda: len(prompts_for(base_model, 2)) >= n, timeout, f"{n} recycled prompts", interval=0.1)
    return time.perf_counter() - start


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * n``."""
    ns, ts = [p[0] for p in points], [p[1] for p in points]
    n_mean, t_mean = statistics.fmean(ns), statistics.fmean(ts)
    slope = sum((n - n_mean) * (t - t_mean) for n, t in points) / sum((n - n_mean) ** 2 for n in ns)
    return t_mean - slope * n_mean, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2 without evaluation: a smoke test")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--mlflow", action="store_true", help="log the results to MLflow (MLFLOW_TRACKING_URI)")
    args = parser.parse_args()
    user_tracking_uri = mlflow.get_tracking_uri()  # before the benchmark points MLflow at its own server
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("mlflow", "urllib3", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    counts = [1, 2] if args.quick else args.prompts
    modes = {"no evaluation": ["evaluate=false"]}
    if not args.quick:
        modes[f"evaluation on {EVAL_EXAMPLES} examples"] = [
            "policy=recycle",  # recycling and judging it: the later stages train, and cost what they are budgeted
            f"eval.limit_val={EVAL_EXAMPLES}",
            f"eval.limit_test={EVAL_EXAMPLES}",
            "eval.random_prompt_draws=3",
        ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = local.TrackingServer(Path(tmp) / "server").start()
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("migration-latency")
        try:
            for mode, overrides in modes.items():
                for n in counts:
                    base_model = f"latency-{'eval' if len(overrides) > 1 else 'noeval'}-{n}"
                    receiver = local.Receiver(
                        server.url,
                        Path(tmp) / base_model,
                        SECRET,
                        [f"hook.watch=[{base_model}]", "hook.poll_seconds=0.1", *overrides],
                    )
                    receiver.start()
                    name = receiver.install_webhook()
                    prompts_on_v1(base_model, n)
                    seconds = time_migration(base_model, n, timeout=60 + 20 * n)
                    receiver.stop()
                    client = mlflow.MlflowClient()
                    for webhook in [w for w in client.list_webhooks() if w.name == name]:
                        client.delete_webhook(webhook.webhook_id)
                    results.append({"mode": mode, "prompts": n, "seconds": seconds, "per_prompt": seconds / n})
                    log.info("%s, %d prompts: %.1f s", mode, n, seconds)
        finally:
            server.stop()
    lines = ["| mode | prompts | latency (s) | per prompt (s) |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['prompts']} | {r['seconds']:.1f} | {r['per_prompt']:.2f} |" for r in results]
    lines += ["", "Fitted `latency = a + b·N` (a: event, model loading and the one recycler fit; b: per prompt):", ""]
    for mode in modes:
        points = [(r["prompts"], r["seconds"]) for r in results if r["mode"] == mode]
        if len(points) > 1:
            a, b = fit_line(points)
            lines.append(f"- {mode}: a = {a:.1f} s, b = {b:.2f} s per prompt")
    markdown = "\n".join(lines)
    print(json.dumps(results, indent=2))
    print(markdown)
    if not args.quick:
        machine = bench_machine()
        command = "python bench/migration_latency.py " + " ".join(sys.argv[1:])
        update_section(
            Path(args.docs), "migration-latency", f"_Generated by `{command.strip()}` on {machine}._\n\n{markdown}"
        )
    if args.mlflow:  # the benchmark's own server is gone: the summary goes to the user's tracking store
        mlflow.set_tracking_uri(user_tracking_uri)
        mlflow.set_experiment("benchmarks")
        with mlflow.start_run(run_name="migration latency"):
            mlflow.log_text(markdown, "migration_latency.md")
            for r in results:
                mode = "eval" if r["mode"].startswith("evaluation") else "noeval"
                mlflow.log_metric(f"{mode}_seconds_{r['prompts']}_prompts", r["seconds"])


if __name__ == "__main__":
    main()
