"""Prompt-tuning throughput: our training step against Hugging Face PEFT's prompt tuning.

Same model, same batch (SST-2 contexts + the label verbalizer), same prompt length, same
optimizer (AdamW on the prompt only). PEFT is used as its docs show for classification
as generation: ``labels`` = -100 everywhere but the verbalizer tokens. Steps alternate
between the two after a warm-up, in one process, and the report is a ratio. Memory: on a
GPU, the peak allocated during a step beyond the model (``torch.cuda.max_memory_allocated``);
on a CPU, where no allocator reports a peak, the bytes autograd keeps for the backward pass
(activations and logits, each storage counted once), the part of training memory that
differs between the two.

    python bench/throughput.py            # full: 30 timed steps each
    python bench/throughput.py --quick    # CI smoke test: 2 steps each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docs_update import update_section  # noqa: E402

from mlflow_recycle.prompted_lm import IGNORE, PromptedLM, TaskEncoder  # noqa: E402
from mlflow_recycle.task import TaskSpec  # noqa: E402

MODEL = ROOT / "assets" / "models" / "small-a"
DATA = ROOT / "assets" / "data" / "sst2"


def batch(encoder: TaskEncoder, size: int) -> dict[str, torch.Tensor]:
    lines = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()[: size * 50]]
    lines = sorted(lines, key=lambda r: -len(r["text"]))[:size]  # the longest: a realistic worst batch
    return encoder.training_batch(encoder.contexts([r["text"] for r in lines]), [r["label"] for r in lines])


def peft_inputs(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows for PEFT: the full sequence (context + verbalizer), loss on the verbalizer only."""
    ids, mask, targets = ours["input_ids"], ours["attention_mask"], ours["targets"]
    last = targets[:, -1:].clamp_min(0)  # single-token verbalizers here
    input_ids = torch.cat([ids, last], 1)
    attention_mask = torch.cat([mask, torch.ones_like(last)], 1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -1] = last[:, 0]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build(kind: str, length: int, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    encoder = TaskEncoder(tokenizer, TaskSpec("sst2", "{text} This movie is", (" bad", " great"), max_length=128))
    if kind == "ours":
        model.requires_grad_(False)
        lm = PromptedLM(model)
        prompt = torch.nn.Parameter(model.get_input_embeddings().weight[:length].detach().clone())
        optimizer = torch.optim.AdamW([prompt], lr=0.01)

        def loss_of(b):
            return lm.loss(prompt, b)
    else:
        import peft

        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)

        def loss_of(b):
            return model(**b).loss

    def step(b):
        loss_of(b).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return encoder, step, loss_of


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_mib(step, loss_of, inputs: dict[str, torch.Tensor], device: str) -> float:
    """MiB a training step needs beyond the model (see the module docstring)."""
    if device == "cuda":
        step(inputs)  # optimizer state exists from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(inputs)
    loss.backward()
    return sum(saved.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed steps: a smoke test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mlflow", action="store_true", help="log the results to MLflow (MLFLOW_TRACKING_URI)")
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    encoder, ours_step, ours_loss = build("ours", args.prompt_length, args.device)
    _, peft_step, peft_loss = build("peft", args.prompt_length, args.device)
    ours_batch = {k: v.to(args.device) for k, v in batch(encoder, args.batch_size).items()}
    peft_batch = {k: v.to(args.device) for k, v in peft_inputs(batch(encoder, args.batch_size)).items()}
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for i in range(steps + 3):  # 3 warm-up rounds
        for name, step, b in (("ours", ours_step, ours_batch), ("peft", peft_step, peft_batch)):
            sync(args.device)
            start = time.perf_counter()
            step(b)
            sync(args.device)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    memory = {
        "ours": memory_mib(ours_step, ours_loss, ours_batch, args.device),
        "peft": memory_mib(peft_step, peft_loss, peft_batch, args.device),
    }
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {
        "device": device,
        "batch_size": args.batch_size,
        "sequence_length": int(peft_batch["input_ids"].shape[1]),
        "prompt_length": args.prompt_length,
        "timed_steps": steps,
        "ours_examples_per_s": rate["ours"],
        "peft_examples_per_s": rate["peft"],
        "speed_ratio": rate["ours"] / rate["peft"],
        "memory_measure": "peak allocated" if args.device == "cuda" else "saved for backward",
        "ours_memory_mib": memory["ours"],
        "peft_memory_mib": memory["peft"],
        "memory_ratio": memory["ours"] / memory["peft"],
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        table = [
            "| | ours | PEFT | ours / PEFT |",
            "|---|---|---|---|",
            f"| examples / s | {rate['ours']:.1f} | {rate['peft']:.1f} | **{result['speed_ratio']:.2f}×** |",
            f"| memory, {result['memory_measure']} (MiB) | {memory['ours']:.0f} | {memory['peft']:.0f} "
            f"| **{result['memory_ratio']:.2f}×** |",
        ]
        command = "python bench/throughput.py " + " ".join(sys.argv[1:])
        header = (
            f"_Generated by `{command.strip()}` on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: "
            f"small-a, batch {args.batch_size}, sequence {result['sequence_length']} tokens + a "
            f"{args.prompt_length}-token prompt, median of {steps} alternating steps after 3 warm-up rounds._"
        )
        update_section(ROOT / "docs" / "benchmarks.md", "throughput", header + "\n\n" + "\n".join(table))
    if args.mlflow:
        import mlflow

        with mlflow.start_run(run_name="throughput vs peft"):
            mlflow.log_params({k: v for k, v in result.items() if isinstance(v, (str, int))})
            mlflow.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
