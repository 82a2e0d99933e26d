"""Temporary main: recycle a vocabulary-sampled prompt from small-a-early to small-a.

Replaced by the Hydra main job (tune, recycle, evaluate, log to MLflow).
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import SoftPrompt, fit_recycler

models = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared" / "models")
loaded = {}
for name in ("small-a-early", "small-a"):
    loaded[name] = (AutoModelForCausalLM.from_pretrained(models / name, dtype=torch.float32), AutoTokenizer.from_pretrained(models / name))
recycler = fit_recycler("linear", *loaded["small-a-early"], *loaded["small-a"])
prompt = SoftPrompt(loaded["small-a-early"][0].get_input_embeddings().weight[2000:2020].detach(), tokenizer_fingerprint=recycler.source_fingerprint)
print(recycler, recycler.transform(prompt).embeddings.shape)
