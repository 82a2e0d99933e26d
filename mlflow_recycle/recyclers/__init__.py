"""Recyclers, looked up by name.

Built-ins: ``linear`` (paper's v2v-lin), ``lincomb`` (lin-comb), ``mlp`` (v2v-nn),
``procrustes``, ``relative`` and ``identity``. Third-party packages add recyclers through the
entry-point group ``mlflow_recycle.recyclers`` (name = ``package.module:RecyclerClass``).
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import RecycleError
from .base import CONFIG_FILE, STATE_FILE, STATE_FORMAT_VERSION, Recycler
from .identity import IdentityRecycler
from .lincomb import LinCombRecycler
from .linear import LinearRecycler
from .mlp import MLPRecycler
from .procrustes import ProcrustesRecycler
from .relative import RelativeRecycler

ENTRY_POINT_GROUP = "mlflow_recycle.recyclers"

BUILTIN_RECYCLERS: dict[str, type[Recycler]] = {
    cls.name: cls
    for cls in (LinearRecycler, LinCombRecycler, MLPRecycler, ProcrustesRecycler, RelativeRecycler, IdentityRecycler)
}


@cache
def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_RECYCLERS}


def available_recyclers() -> list[str]:
    """Names of every recycler: built-in and registered through entry points."""
    return sorted({*BUILTIN_RECYCLERS, *_plugins()})


def recycler_class(name: str) -> type[Recycler]:
    if name in BUILTIN_RECYCLERS:
        return BUILTIN_RECYCLERS[name]
    if name in _plugins():
        cls = _plugins()[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Recycler)):
            raise RecycleError(
                f"Entry point {name!r} in group {ENTRY_POINT_GROUP!r} loads {cls!r}, not a Recycler subclass: "
                "fix the plugin's entry point."
            )
        return cls
    raise RecycleError(
        f"Unknown recycler {name!r}. Known recyclers: {', '.join(available_recyclers())}. "
        f"Third-party recyclers register under the entry-point group {ENTRY_POINT_GROUP!r}."
    )


def get_recycler(name: str, **config: Any) -> Recycler:
    """A new, unfitted recycler ``name`` with options ``config``."""
    cls = recycler_class(name)
    try:
        return cls(**config)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(cls).parameters)
        raise RecycleError(f"Bad options for recycler {name!r} ({exc}); it accepts: {accepted}.") from exc


def load_recycler(path: str | Path) -> Recycler:
    """A fitted recycler saved by :meth:`Recycler.save`."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / STATE_FILE))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise RecycleError(
            f"Cannot read a fitted recycler from {str(path)!r} ({exc}): expected {CONFIG_FILE} and {STATE_FILE} "
            "written by Recycler.save. Re-fit the recycler."
        ) from exc
    if meta.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise RecycleError(f"{path / CONFIG_FILE} was written by a newer mlflow-recycle: upgrade it.")
    options = {key: value for key, value in meta["config"].items() if key != "behaviour"}  # set by load_state
    recycler = get_recycler(meta["name"], **options)
    recycler.load_state(meta, state)
    return recycler


__all__ = [
    "BUILTIN_RECYCLERS",
    "ENTRY_POINT_GROUP",
    "IdentityRecycler",
    "LinCombRecycler",
    "LinearRecycler",
    "MLPRecycler",
    "ProcrustesRecycler",
    "Recycler",
    "RelativeRecycler",
    "available_recyclers",
    "get_recycler",
    "load_recycler",
    "recycler_class",
]
