"""SoftPrompt: a prompt-tuning tensor together with what it takes to use it safely.

A bare ``[length, dim]`` tensor is only meaningful with the model, tokenizer, template
and label words it was trained with. ``SoftPrompt`` keeps those next to the tensor so
that a prompt can refuse a model it does not fit, and records its lineage when it was
recycled from another model.

On disk a prompt is a Hugging Face PEFT prompt-tuning adapter (``adapter_config.json``
and ``adapter_model.safetensors`` with one tensor ``prompt_embeddings``), so
``peft.PeftModel.from_pretrained(base, path)`` loads it, plus one file of ours,
``mlflow_recycle.json``, with the metadata PEFT has no place for. A directory written by
PEFT alone loads too (with the metadata PEFT knows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import IncompatibleModelError, PromptArtifactError, RecycleError
from .task import TaskSpec
from .vocab import tokenizer_fingerprint

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_LEGACY_WEIGHTS_FILE = "adapter_model.bin"
METADATA_FILE = "mlflow_recycle.json"
PEFT_TENSOR_KEY = "prompt_embeddings"
METADATA_FORMAT_VERSION = 1

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
#: Base-model URIs that name an MLflow model rather than weights PEFT can load.
MLFLOW_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class SoftPrompt:
    """A soft prompt (``[length, dim]`` float tensor) and its metadata.

    Attributes:
        embeddings: the prompt rows, prepended to the input embeddings of the base model.
        base_model: the base model's registered name (or hub id / path when unregistered).
        base_model_uri: where to load the base model: ``models:/name/version``, a local
            path or a hub id.
        base_model_version: the registered version of the base model, as a string.
        base_model_path: the local directory or hub id the base model's weights were loaded
            from, written as PEFT's ``base_model_name_or_path`` so that
            ``peft.AutoPeftModelForCausalLM.from_pretrained(prompt_dir)`` finds them.
            Taken from ``base_model_uri`` whenever that is a path or hub id, and kept when
            ``base_model_uri`` is replaced by a ``models:/`` URI (:func:`~mlflow_recycle.registry.tie`).
        tokenizer_fingerprint: :func:`~mlflow_recycle.vocab.tokenizer_fingerprint` of the
            base model's tokenizer.
        task_type: PEFT's ``CAUSAL_LM`` or ``SEQ_2_SEQ_LM`` (prompt on the encoder input).
        init: how the prompt was initialised before tuning (``random``, ``vocab``, ...).
        task: template, verbalizers and evaluation data reference, when known.
        recycled_from: reference of the prompt this one was recycled from.
        recycler: name of the recycler that produced it.
        recycler_config: that recycler's options.
        cost: what producing it on its base model cost: ``steps``, ``seconds`` and the
            base model's ``parameters`` (what a migration compares its own cost against).
    """

    embeddings: torch.Tensor
    base_model: str | None = None
    base_model_uri: str | None = None
    base_model_version: str | None = None
    tokenizer_fingerprint: str | None = None
    task_type: str = "CAUSAL_LM"
    init: str | None = None
    task: TaskSpec | None = None
    recycled_from: str | None = None
    recycler: str | None = None
    recycler_config: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    base_model_path: str | None = None

    def __post_init__(self) -> None:
        emb = self.embeddings
        if not isinstance(emb, torch.Tensor):
            raise RecycleError(f"SoftPrompt embeddings must be a torch.Tensor, got {type(emb).__name__}.")
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise RecycleError(
                f"SoftPrompt embeddings must be a non-empty [length, dim] matrix, got shape {tuple(emb.shape)}."
            )
        if not emb.is_floating_point():
            raise RecycleError(f"SoftPrompt embeddings must be floating point, got {emb.dtype}.")
        if not torch.isfinite(emb).all():
            raise RecycleError(
                "SoftPrompt embeddings contain NaN or inf: the prompt diverged during tuning or recycling. "
                "Re-tune it (a lower learning rate) or check the recycler's inputs."
            )
        if self.task_type not in TASK_TYPES:
            raise RecycleError(f"Unknown task_type {self.task_type!r}; expected one of {TASK_TYPES}.")
        if self.base_model_uri and not self.base_model_uri.startswith(MLFLOW_URI_SCHEMES):
            object.__setattr__(self, "base_model_path", self.base_model_uri)
        # Detached float32 on CPU: the canonical, bit-exact form for saving and recycling.
        object.__setattr__(self, "embeddings", emb.detach().to("cpu", torch.float32).contiguous())

    @property
    def length(self) -> int:
        """Number of virtual tokens."""
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        """Embedding width of the base model."""
        return int(self.embeddings.shape[1])

    @property
    def digest(self) -> str:
        """What makes two prompts the same prompt: the tensor, the base it is tied to, the task."""
        task = json.dumps(self.task.to_dict() if self.task else None, sort_keys=True)
        tie = f"{self.base_model}|{self.base_model_version}|{task}".encode()
        return hashlib.sha256(self.embeddings.numpy().tobytes() + tie).hexdigest()[:32]

    def replace(self, **changes: Any) -> SoftPrompt:
        """A copy with some fields changed (the tensor is shared, never modified in place)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ compatibility
    def check_fits(self, *, dim: int, fingerprint: str | None, model: str = "the model") -> None:
        """Raise :class:`IncompatibleModelError` unless a model of this dim and tokenizer can use the prompt."""
        problems = []
        if dim != self.dim:
            problems.append(f"embedding dim {self.dim} vs {dim}")
        if fingerprint and self.tokenizer_fingerprint and fingerprint != self.tokenizer_fingerprint:
            problems.append(f"tokenizer {self.tokenizer_fingerprint} vs {fingerprint}")
        if problems:
            raise IncompatibleModelError(
                f"Soft prompt for base model {self.describe_base()} does not fit {model}: "
                f"{'; '.join(problems)} (prompt vs model). A prompt only works with the model it was trained on: "
                "recycle it to this model first (e.g. `mlflow-recycle recycle`), or load it with its own base model."
            )

    def check_fits_model(self, model: Any, tokenizer: Any | None = None, name: str = "the model") -> None:
        """:meth:`check_fits` against a Hugging Face model (and tokenizer, when given)."""
        dim = int(model.get_input_embeddings().weight.shape[1])
        self.check_fits(dim=dim, fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer else None, model=name)

    def describe_base(self) -> str:
        name = self.base_model or "<unknown>"
        version = f" v{self.base_model_version}" if self.base_model_version else ""
        return f"{name!r}{version}"

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensor, as JSON-compatible values."""
        return {
            "format_version": METADATA_FORMAT_VERSION,
            "length": self.length,
            "dim": self.dim,
            "base_model": self.base_model,
            "base_model_uri": self.base_model_uri,
            "base_model_version": self.base_model_version,
            "base_model_path": self.base_model_path,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "task_type": self.task_type,
            "init": self.init,
            "task": self.task.to_dict() if self.task else None,
            "recycled_from": self.recycled_from,
            "recycler": self.recycler,
            "recycler_config": self.recycler_config,
            "cost": self.cost,
        }

    def peft_config(self) -> dict[str, Any]:
        """PEFT's ``PromptTuningConfig`` as ``save_pretrained`` writes it."""
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": self.task_type,
            "num_virtual_tokens": self.length,
            "token_dim": self.dim,
            # Our prompts condition the (encoder) input only, also for seq2seq models.
            "num_transformer_submodules": 1,
            "num_attention_heads": None,
            "num_layers": None,
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            # Where PEFT can load the base from (AutoPeftModel*); the models:/ URI is in METADATA_FILE.
            "base_model_name_or_path": self.base_model_path or self.base_model,
            "revision": None,
            "inference_mode": True,
            "auto_mapping": None,
            "modules_to_save": None,
        }

    def save(self, path: str | Path) -> Path:
        """Write the PEFT adapter layout plus our metadata file into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({PEFT_TENSOR_KEY: self.embeddings}, str(path / PEFT_WEIGHTS_FILE))
        (path / PEFT_CONFIG_FILE).write_text(json.dumps(self.peft_config(), indent=2) + "\n")
        (path / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SoftPrompt:
        """Read a directory written by :meth:`save` or by PEFT's ``save_pretrained``."""
        path = Path(path)
        if not path.is_dir():
            raise PromptArtifactError(
                f"No soft prompt directory at {str(path)!r}. Pass the directory holding "
                f"{PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}."
            )
        config = _read_json(path / PEFT_CONFIG_FILE, required=True)
        if config.get("peft_type") != "PROMPT_TUNING":
            raise PromptArtifactError(
                f"{path / PEFT_CONFIG_FILE} describes a {config.get('peft_type')!r} adapter, not PROMPT_TUNING; "
                "only prompt-tuning adapters are soft prompts."
            )
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise PromptArtifactError(
                f"{path} holds a PEFT prompt with num_transformer_submodules="
                f"{config['num_transformer_submodules']} (separate encoder and decoder prompts). "
                "Only input (encoder) prompts are supported: re-train with num_transformer_submodules=1."
            )
        embeddings = _read_prompt_tensor(path)
        expected = (config.get("num_virtual_tokens"), config.get("token_dim"))
        if tuple(embeddings.shape) != expected:
            raise PromptArtifactError(
                f"{path}: {PEFT_TENSOR_KEY} has shape {tuple(embeddings.shape)} but {PEFT_CONFIG_FILE} says "
                f"num_virtual_tokens={expected[0]}, token_dim={expected[1]}. The files come from different "
                "prompts: restore them from the same save."
            )
        meta = _read_json(path / METADATA_FILE, required=False)
        if meta is None:  # a plain PEFT directory
            return cls(
                embeddings=embeddings,
                base_model=config.get("base_model_name_or_path"),
                base_model_uri=config.get("base_model_name_or_path"),
                task_type=config.get("task_type") or "CAUSAL_LM",
                init=str(config.get("prompt_tuning_init") or "").lower() or None,
            )
        if meta.get("format_version", 0) > METADATA_FORMAT_VERSION:
            raise PromptArtifactError(
                f"{path / METADATA_FILE} has format_version {meta['format_version']}, newer than this "
                f"mlflow-recycle understands ({METADATA_FORMAT_VERSION}): upgrade mlflow-recycle."
            )
        return cls(
            embeddings=embeddings,
            base_model=meta.get("base_model"),
            base_model_uri=meta.get("base_model_uri"),
            base_model_version=meta.get("base_model_version"),
            base_model_path=meta.get("base_model_path"),
            tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
            task_type=meta.get("task_type") or "CAUSAL_LM",
            init=meta.get("init"),
            task=TaskSpec.from_dict(meta["task"]) if meta.get("task") else None,
            recycled_from=meta.get("recycled_from"),
            recycler=meta.get("recycler"),
            recycler_config=meta.get("recycler_config") or {},
            cost=meta.get("cost") or {},
        )


def _read_json(file: Path, required: bool) -> dict[str, Any] | None:
    if not file.is_file():
        if required:
            raise PromptArtifactError(
                f"Missing {file.name} in {file.parent}: not a soft prompt directory, or an incomplete copy. "
                "Re-download or re-log the prompt."
            )
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptArtifactError(
            f"{file} is not valid JSON ({exc}); the artifact is corrupt: re-log the prompt."
        ) from exc
    if not isinstance(data, dict):
        raise PromptArtifactError(f"{file} must hold a JSON object; the artifact is corrupt: re-log the prompt.")
    return data


def _read_prompt_tensor(path: Path) -> torch.Tensor:
    weights = path / PEFT_WEIGHTS_FILE
    legacy = path / PEFT_LEGACY_WEIGHTS_FILE
    try:
        if weights.is_file():
            tensors = load_file(str(weights))
        elif legacy.is_file():
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise PromptArtifactError(
                f"Missing {PEFT_WEIGHTS_FILE} in {path}: the prompt's tensor was not saved or was deleted. "
                "Re-download or re-log the prompt."
            )
    except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
        raise PromptArtifactError(
            f"Cannot read the prompt tensor in {path} ({exc}): the file is corrupt or truncated. "
            "Re-download or re-log the prompt."
        ) from exc
    if PEFT_TENSOR_KEY not in tensors:
        raise PromptArtifactError(
            f"{path}: the weights file has no {PEFT_TENSOR_KEY!r} tensor (found {sorted(tensors)}); "
            "it is not a prompt-tuning adapter."
        )
    return tensors[PEFT_TENSOR_KEY].to(torch.float32)
