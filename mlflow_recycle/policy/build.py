"""The one place a policy and a transfer are built from a config: the job, a migration and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ..config import with_recipe
from ..models import LoadedModel
from ..prompt import SoftPrompt
from .config import Policy
from .transfer import MapStore, Transfer


def build_policy(cfg: DictConfig, target: Mapping[str, Any] | None = None) -> Policy:
    """``cfg.policy``, its re-tuning with the ``target`` model's recipe (its ``recipe:`` block) applied."""
    return Policy.from_config(with_recipe(cfg, target).policy)


def build_transfer(
    cfg: DictConfig,
    source: LoadedModel,
    target: LoadedModel,
    *,
    prompts: Sequence[SoftPrompt] = (),
    store: MapStore | None = None,
) -> Transfer:
    """The pair with the config's trainer, evaluation (``conf/eval``), anchors and seed."""
    return Transfer(
        source,
        target,
        instantiate(cfg.trainer, _partial_=True),
        prompts,
        limit_val=cfg.eval.limit_val,
        eval_batch_size=cfg.eval.batch_size,
        random_draws=cfg.eval.random_prompt_draws,
        seed=cfg.seed,
        prompts_per_pass=cfg.eval.get("prompts_per_pass", 1),
        anchor_offset=cfg.anchors.offset,
        anchor_size=cfg.anchors.size,
        store=store,
    )
