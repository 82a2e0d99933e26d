"""Distributed strategies configured from Hydra (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy


def _is_block(module: nn.Module, names: frozenset[str]) -> bool:
    return type(module).__name__ in names


def fsdp_strategy(layer_class_names: Sequence[str], **kwargs: Any) -> FSDPStrategy:
    """FSDP that shards each transformer block of the frozen model across ranks.

    Blocks are matched by class name (``LlamaDecoderLayer``, ``GPT2Block``, ...), so one
    config serves every architecture. The prompt lives in the root unit next to frozen
    embeddings, which FSDP only allows with ``use_orig_params=True``.
    """
    policy = functools.partial(
        lambda_auto_wrap_policy, lambda_fn=functools.partial(_is_block, names=frozenset(layer_class_names))
    )
    return FSDPStrategy(auto_wrap_policy=policy, use_orig_params=True, **kwargs)
