"""The Hydra configuration in ``conf/``, for the CLI and for programmatic use.

``compose(["recycler=mlp", "task=imdb"])`` gives the same config as
``python -m mlflow_recycle recycler=mlp task=imdb``; the migration worker, benchmarks and
tests use it to run jobs in-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

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
    which a model's ``recipe:`` block leaves as given (:func:`mlflow_recycle.job.with_recipe`)."""
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
