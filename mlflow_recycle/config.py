"""The Hydra configuration in ``conf/``, for the CLI and for programmatic use.

``compose(["recycler=mlp", "task=imdb"])`` gives the same config as
``python -m mlflow_recycle recycler=mlp task=imdb``; the migration worker, benchmarks and
tests use it to run jobs in-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# `${repo_root:}` in conf/paths: the checkout, so configs work from any working directory.
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed job config for ``overrides`` (Hydra's override syntax)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
