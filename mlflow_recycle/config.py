"""The Hydra configuration in ``conf/``, for the CLI and for programmatic use.

``compose(["recycler=mlp", "task=imdb"])`` gives the same config as
``python -m mlflow_recycle recycler=mlp task=imdb``; the migration worker, benchmarks and
tests use it to run jobs in-process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# `${repo_root:}` in conf/paths: the checkout, so configs work from any working directory.
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed job config for ``overrides`` (Hydra's override syntax)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return with_overridden(hydra_compose(config_name=config_name, overrides=list(overrides)), overrides)


def with_overridden(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` recording, as ``overridden``, the settings ``overrides`` name (a group pick such as
    ``prompt/scheduler=one_cycle`` as ``prompt.scheduler``): what the user chose for this run,
    which a model's ``recipe:`` block leaves as given (:func:`with_recipe`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    with open_dict(cfg):
        cfg.overridden = [o.package or o.key_or_group.replace("/", ".") for o in parsed]
    return cfg


def instantiate_partial(config: DictConfig | dict | None, setting: str):
    """``hydra.utils.instantiate`` for a ``_target_`` + ``_partial_: true`` setting (an optimizer,
    a scheduler); None stays None. A target that does not import or accept the arguments is
    one error naming ``setting``."""
    if not config:  # None, or the empty `constant` scheduler
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from .errors import RecycleError

    values = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if not isinstance(values, dict) or "_target_" not in values:
        raise RecycleError(f"{setting} needs a _target_ (e.g. torch.optim.AdamW) and _partial_: true, got {values!r}.")
    try:
        return instantiate({**values, "_partial_": True})
    except InstantiationException as exc:
        raise RecycleError(f"Cannot build {setting} ({values['_target_']}): {exc}") from exc


#: What a model's ``recipe:`` block may set: how prompts are tuned on it, never what the task is.
RECIPE_GROUPS = ("prompt", "trainer")
RECIPE_KEYS = ("task.batch_size",)


def model_recipe(model: Mapping[str, Any]) -> dict[str, Any] | None:
    """A model config's ``recipe:`` block as a plain dict (None: it has none), as a base version keeps it."""
    recipe = model.get("recipe")
    return OmegaConf.to_container(recipe, resolve=True) if recipe else None


def with_recipe(cfg: DictConfig, model: Mapping[str, Any] | None) -> DictConfig:
    """``cfg`` with a model's tuning recipe (the ``recipe:`` block of its ``conf/model`` entry, or
    the one a registered base version carries) merged over ``prompt``, ``trainer`` and the training
    batch ``task.batch_size``: every prompt tuned on that model, by the job, the benchmarks or a
    migration's re-tuning, uses it. A setting the run's overrides name stays as given (a sweep
    over ``prompt.optimizer.lr``)."""
    from .errors import RecycleError
    from .tracking import flatten

    recipe = model.get("recipe") if model is not None else None
    if not recipe:
        return cfg
    recipe = OmegaConf.to_container(recipe) if isinstance(recipe, DictConfig) else dict(recipe)
    settings = flatten(recipe)
    unknown = sorted(k for k in settings if k.split(".")[0] not in RECIPE_GROUPS and k not in RECIPE_KEYS)
    if unknown:
        *first, last = [f"`{name}`" for name in (*RECIPE_GROUPS, *RECIPE_KEYS)]
        raise RecycleError(f"Model {model.get('name')!r}: recipe may set {', '.join(first)} and {last}, not {unknown}.")
    given = tuple(cfg.get("overridden") or ())
    merged = cfg.copy()
    for key, value in settings.items():
        kept = next((g for g in given if key == g or key.startswith(f"{g}.")), None)
        if kept is None:
            OmegaConf.update(merged, key, value, merge=True, force_add=True)
        else:
            _kept_override(str(model.get("name")), key, str(value), kept)
    return merged


@cache
def _kept_override(model: str, key: str, value: str, kept: str) -> None:
    """Say once per process (the recipe is applied wherever a prompt is tuned or a config logged)."""
    log.info("Model %s's recipe sets %s=%s; this run's override of %s is kept.", model, key, value, kept)
