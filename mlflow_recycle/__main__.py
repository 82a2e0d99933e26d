"""``python -m mlflow_recycle [overrides]``: the main job as a Hydra app (configs in ``conf/``)."""

from __future__ import annotations

import logging
import os
import shlex
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from .config import CONF_DIR  # noqa: E402
from .errors import RecycleError  # noqa: E402

log = logging.getLogger("mlflow_recycle")


def expand_overrides(argv: list[str]) -> list[str]:
    """Split ``--overrides "a=1 b=2"`` into Hydra overrides.

    MLflow passes each MLproject parameter as one shell-quoted word, so the free
    ``overrides`` parameter arrives as a single argument that Hydra would read as one
    override; an empty one is dropped.
    """
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--overrides":
            out.extend(shlex.split(next(args, "")))
        elif arg.startswith("--overrides="):
            out.extend(shlex.split(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the configured job; returns the success flag (for Hydra sweepers) when there is one."""
    from hydra.core.hydra_config import HydraConfig

    from .config import with_overridden
    from .job import run

    with_overridden(cfg, HydraConfig.get().overrides.task)
    try:
        metrics = run(cfg)
    except RecycleError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # what was interrupted and kept is logged where it happened (tracking.job_run)
    return metrics.get("success", 0.0)


if __name__ == "__main__":
    sys.argv = expand_overrides(sys.argv)
    main()
