"""A logged model's pip requirements: installed packages pinned, and this package as one.

A fresh serving environment installs this package as ``mlflow-recycle==<version>`` when the
running code was installed from a package index, else from a wheel of the running code in the
model's ``wheels/`` folder (the folder MLflow's own ``add_libraries_to_model`` uses), which
MLflow's environment managers install from the model directory.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import zipfile
from pathlib import Path

from mlflow.utils.requirements_utils import _get_pinned_requirement
from packaging.version import Version

from .errors import RecycleError

PACKAGE = "mlflow-recycle"
#: Top-level packages of the ``mlflow-recycle`` distribution (setup.cfg's packages).
PACKAGE_MODULES = ("mlflow_recycle", "lightning_modules")
WHEELS_DIR = "wheels"


@functools.cache  # once per process: a migration logs many prompts with the same environment
def pinned_requirement(package: str) -> str:
    """``package==<installed version>``, pinned by MLflow's ``_get_pinned_requirement``.

    The version given is the public one: MLflow means to drop a local label (``+cpu``,
    ``+cu126``) that PyPI cannot serve, but with packaging >= 26 its
    ``_strip_local_version_label`` keeps the label (it overrides ``Version.local``, which
    ``Version.__str__`` no longer reads), so the requirement would not install.
    """
    return _get_pinned_requirement(package, version=Version(importlib.metadata.version(package)).public)


def _distribution() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _from_index() -> bool:
    return _installed_from_index(_distribution())


def _installed_from_index(dist: importlib.metadata.Distribution | None) -> bool:
    """Whether the running code is a distribution an installer (pip, uv) took from a package index.

    Such a distribution has an ``INSTALLER`` file and no PEP 610 ``direct_url.json`` (which
    marks editable, local-directory, VCS and file installs), and holds the imported code (not
    a source tree on ``PYTHONPATH`` shadowing it, whose ``.egg-info`` has neither file).
    """
    if dist is None or dist.read_text("INSTALLER") is None or dist.read_text("direct_url.json") is not None:
        return False
    from . import __file__ as init_file

    return Path(dist.locate_file("mlflow_recycle/__init__.py")).resolve() == Path(init_file).resolve()


def package_requirement(model_path: str | os.PathLike) -> str:
    """This package as a requirement a fresh environment can install, for the model at ``model_path``.

    ``mlflow-recycle==<version>`` when the running code was installed from a package index;
    otherwise (an editable, local-directory or VCS install, a source tree) a wheel of the
    installed code written to ``<model>/wheels/`` and named by its path relative to the model
    directory.
    """
    if _from_index():
        return pinned_requirement(PACKAGE)
    filename, data = _package_wheel()
    wheels = Path(model_path) / WHEELS_DIR
    wheels.mkdir(exist_ok=True)
    (wheels / filename).write_bytes(data)
    return f"{WHEELS_DIR}/{filename}"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@functools.cache
def _package_wheel() -> tuple[str, bytes]:
    """``(file name, bytes)`` of a pure-Python wheel of the running code, with its installed metadata (built once).

    Written directly (a zip of the packages and a ``.dist-info`` folder) rather than by ``pip
    wheel``, which needs the source tree (a local-directory or VCS install keeps none), pip and a
    build backend in the environment (or an index to fetch one), and builds inside that tree.
    """
    from . import __version__

    dist = _distribution()
    version = dist.version if dist is not None else __version__
    files: dict[str, bytes] = {}
    for module in PACKAGE_MODULES:
        spec = importlib.util.find_spec(module)  # finds the package without importing it (lightning is slow)
        if spec is None or not spec.submodule_search_locations:
            raise RecycleError(f"Cannot find the {module} package to bundle with the model.")
        root = Path(next(iter(spec.submodule_search_locations)))
        for file in sorted(root.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                files[f"{module}/{file.relative_to(root).as_posix()}"] = file.read_bytes()
    metadata = f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n"
    if dist is not None:  # the installed metadata as it is (an .egg-info's file is PKG-INFO)
        metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or metadata
    info = f"mlflow_recycle-{version}.dist-info"
    files[f"{info}/METADATA"] = metadata.encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: mlflow_recycle.requirements\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    return f"mlflow_recycle-{version}-py3-none-any.whl", buffer.getvalue()
