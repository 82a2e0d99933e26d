"""Device parity: the same recycled prompts scored on the GPU and on the CPU, on the same examples.

On 2026-11-28 prompts recycled small-a -> large (``linear``) read 1-3.4 points higher on an H200
than on the CPU on the gate's 500 validation phrases (docs/benchmarks.md, section 6). This prints
both devices' accuracies for the zero-shot baseline and a few such prompts, to settle it:

    python bench/gpu/parity.py                   # on the GPU machine (bench/gpu/run.sh runs it first)
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from docs_update import bench_logging  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from recycling_matrix import Matrix  # noqa: E402

from mlflow_recycle.evaluation import Evaluator  # noqa: E402
from mlflow_recycle.job import data_module, task_spec  # noqa: E402
from mlflow_recycle.recycle import fit_recycler  # noqa: E402
from mlflow_recycle.recyclers import get_recycler  # noqa: E402

PROMPTS = [("class_labels", 1), ("random", 1), ("vocab", 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2_plain")
    parser.add_argument("--pair", default="small-a:large")
    parser.add_argument("--cache", default=str(ROOT / "bench" / "cache"))
    args = parser.parse_args()
    bench_logging()
    source, target = args.pair.split(":")
    scores = {}
    for device in ("gpu", "cpu"):
        matrix = Matrix(argparse.Namespace(cache=args.cache, quick=False, set=[f"trainer.accelerator={device}"]))
        cfg = matrix.config(args.task, model=target)
        src, tgt = matrix.model(source), matrix.model(target)
        data = data_module(tgt, task_spec(cfg.task), cfg)
        evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("validation",), 0)
        recycler = fit_recycler(
            get_recycler("linear"), src.model, src.tokenizer, tgt.model, tgt.tokenizer,
            anchor_offset=cfg.anchors.offset, anchor_size=cfg.anchors.size,
        )  # fmt: skip
        scores[device, "zero-shot"] = evaluator.accuracy(tgt, data, None, "zero_shot")["validation"]
        for init, seed in PROMPTS:
            prompt, _ = matrix.tuned(args.task, source, init, seed)
            recycled = recycler.transform(prompt).embeddings
            scores[device, f"{init} seed {seed}"] = evaluator.accuracy(tgt, data, recycled, "recycled")["validation"]
    print(f"| {args.task} {args.pair} | gpu | cpu | gpu - cpu |\n|---|---|---|---|")
    for name in ["zero-shot", *(f"{i} seed {s}" for i, s in PROMPTS)]:
        gpu, cpu = scores["gpu", name], scores["cpu", name]
        print(f"| {name} | {gpu:.3f} | {cpu:.3f} | {100 * (gpu - cpu):+.1f} |")


if __name__ == "__main__":
    main()
