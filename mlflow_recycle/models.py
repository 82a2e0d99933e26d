"""Loading frozen Hugging Face models: from a directory or hub id, or from the MLflow registry.

One place for "what is this model and how do I load it", used by the jobs, the registry
helpers, the pyfunc and the migration worker.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .errors import RecycleError
from .vocab import tokenizer_fingerprint

log = logging.getLogger(__name__)

MLFLOW_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class LoadedModel:
    """A frozen model with its tokenizer, and where it came from."""

    name: str
    uri: str
    model: Any
    tokenizer: Any
    registered_name: str | None = None

    @property
    def seq2seq(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def dim(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @cached_property
    def parameters(self) -> int:
        """Parameter count: what a training step's compute scales with."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load_pretrained(path: str, dtype: torch.dtype | None = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory or hub id; causal or encoder-decoder.

    ``dtype=None`` keeps the checkpoint's dtype (for re-saving without a copy in float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RecycleError(
            f"Cannot load a model from {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Check the path: local models need ../shared beside the checkout (or MLFLOW_RECYCLE_SHARED), "
            "hub ids need network access."
        ) from exc
    return model.eval().requires_grad_(False), tokenizer


@functools.lru_cache(maxsize=4)
def load_base_model(uri: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 for a base-model URI, cached per process.

    ``models:/``, ``runs:/`` and ``mlflow-artifacts:/`` URIs are ``mlflow.transformers``
    models; anything else is a local directory or hub id.
    """
    if uri.startswith(MLFLOW_URI_SCHEMES):
        import mlflow

        components = mlflow.transformers.load_model(uri, return_type="components")
        model, tokenizer = components["model"].float().eval().requires_grad_(False), components["tokenizer"]
    else:
        model, tokenizer = load_pretrained(uri)
    log.info("Loaded base model %s", uri)
    return model, tokenizer
