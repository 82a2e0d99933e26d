"""The recycler interface: fit a map on anchor embeddings, apply it to prompts.

Subclasses implement only the math (``_fit``, ``_transform``, ``_state``/``_load_state``);
this base class owns input validation, the ``match_norm`` option and persistence, so every
recycler rejects bad input the same way and saves in the same layout.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, overload

import torch
from safetensors.torch import save_file

from ..errors import IncompatibleModelError, RecycleError
from ..prompt import SoftPrompt

CONFIG_FILE = "recycler.json"
STATE_FILE = "recycler.safetensors"
STATE_FORMAT_VERSION = 1

R = TypeVar("R", bound="Recycler")


def check_matrix(what: str, x: Any, dim: int | None = None) -> torch.Tensor:
    """Validate a ``[n, d]`` float matrix and return it as float64 (our working precision)."""
    if not isinstance(x, torch.Tensor):
        raise RecycleError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 2 or x.shape[0] == 0:
        raise RecycleError(f"{what} must be a non-empty [rows, dim] matrix, got shape {tuple(x.shape)}.")
    if dim is not None and x.shape[1] != dim:
        raise IncompatibleModelError(
            f"{what} has dim {x.shape[1]} but the recycler was fitted for dim {dim}: "
            "fit a recycler on this prompt's source model, or pass the prompt that belongs to it."
        )
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise RecycleError(
            f"{what} contains NaN or inf in {bad} of {x.shape[0]} rows; a recycler fitted or applied on them would "
            "produce a broken prompt. Check the model weights / prompt (a diverged run?)."
        )
    return x.detach().to("cpu", torch.float64)


class Recycler(ABC):
    """Maps prompts from a source model's embedding space to a target model's.

    Use: ``recycler.fit(S, T)`` with the anchors' source and target embeddings
    (``[n, d_src]``, ``[n, d_tgt]``), then ``recycler.transform(prompt)``.

    Args:
        match_norm: rescale each recycled row so that its norm, relative to the target
            vocabulary's mean norm, equals the source row's norm relative to the source
            vocabulary's mean norm. Trained prompts sit far from the vocabulary; a map
            fitted on the vocabulary can shrink or inflate them, and this undoes that.
    """

    #: Name under which :func:`~mlflow_recycle.recyclers.get_recycler` finds the class.
    name: ClassVar[str]
    #: Whether fitting needs at least as many anchors as source dimensions.
    needs_full_rank: ClassVar[bool] = True
    #: Whether fitting learns a map from the anchors (``identity`` only checks the dims).
    learns: ClassVar[bool] = True
    #: The fitted tensors that training the map on behaviour may adjust
    #: (:class:`~lightning_modules.MapDistillationModule`); empty: this map cannot be trained so.
    trainable: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, match_norm: bool = False) -> None:
        self.match_norm = bool(match_norm)
        self.source_dim: int | None = None
        self.target_dim: int | None = None
        self._anchor_norms: torch.Tensor | None = None  # mean row norm of S and of T
        #: Tokenizer fingerprints of the two spaces, when known: a fitted recycler then
        #: refuses a prompt of another tokenizer even when the dims happen to match.
        self.source_fingerprint: str | None = None
        self.target_fingerprint: str | None = None
        #: How the map was trained on behaviour after fitting (settings, prompts, task), or None.
        self.behaviour: dict[str, Any] | None = None

    # ------------------------------------------------------------------ interface
    def options(self) -> dict[str, Any]:
        """The subclass's constructor options (JSON values), recorded as lineage."""
        return {}

    @abstractmethod
    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Fit on validated float64 anchors."""

    @abstractmethod
    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        """Map a validated float64 ``[length, d_src]`` matrix to ``[length, d_tgt]``."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with :meth:`options`, reproduce the fitted recycler."""

    @abstractmethod
    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`_state`."""

    # ------------------------------------------------------------------ public API
    @property
    def config(self) -> dict[str, Any]:
        behaviour = {"behaviour": self.behaviour} if self.behaviour is not None else {}
        return {**self.options(), "match_norm": self.match_norm, **behaviour}

    @property
    def is_fitted(self) -> bool:
        return self.source_dim is not None

    def fit(
        self: R,
        source: torch.Tensor,
        target: torch.Tensor,
        *,
        source_fingerprint: str | None = None,
        target_fingerprint: str | None = None,
    ) -> R:
        """Fit the map on anchor embeddings (row ``i`` of both is the same token); returns ``self``."""
        s = check_matrix("source anchor embeddings", source)
        t = check_matrix("target anchor embeddings", target)
        if s.shape[0] != t.shape[0]:
            raise RecycleError(
                f"source and target anchor embeddings must pair row by row, got {s.shape[0]} and {t.shape[0]} rows: "
                "index both tables with the same Anchors."
            )
        if self.needs_full_rank and s.shape[0] < s.shape[1]:
            raise RecycleError(
                f"{s.shape[0]} anchors are fewer than the source dimension {s.shape[1]}: the map is under-determined. "
                "Use more anchors (anchors.size) or a recycler without this need (procrustes, identity)."
            )
        self._fit(s, t)
        self.source_dim, self.target_dim = int(s.shape[1]), int(t.shape[1])
        self._anchor_norms = torch.stack([s.norm(dim=1).mean(), t.norm(dim=1).mean()])
        self.source_fingerprint, self.target_fingerprint = source_fingerprint, target_fingerprint
        return self

    @overload
    def transform(self, prompt: torch.Tensor, recycled_from: str | None = None) -> torch.Tensor: ...
    @overload
    def transform(self, prompt: SoftPrompt, recycled_from: str | None = None) -> SoftPrompt: ...

    def transform(
        self, prompt: torch.Tensor | SoftPrompt, recycled_from: str | None = None
    ) -> torch.Tensor | SoftPrompt:
        """Recycle a prompt.

        A tensor gives a float32 tensor. A :class:`SoftPrompt` is first checked against
        the source space (dim, tokenizer fingerprint) and gives a new one with the lineage
        filled in (``recycled_from``, defaulting to a description of the source base
        model, the recycler and its config), the target's tokenizer fingerprint and no
        base model: the caller knows the target's name and version and sets them.
        """
        if not self.is_fitted:
            raise RecycleError(
                f"The {self.name!r} recycler is not fitted: call fit(source, target) or load a fitted one."
            )
        if isinstance(prompt, SoftPrompt):
            prompt.check_fits(
                dim=self.source_dim, fingerprint=self.source_fingerprint, model="this recycler's source model"
            )
            return prompt.replace(
                embeddings=self.transform(prompt.embeddings),
                base_model=None,
                base_model_uri=None,
                base_model_version=None,
                base_model_path=None,  # the source's: never where the target loads from
                tokenizer_fingerprint=self.target_fingerprint,
                recycled_from=recycled_from or f"prompt for {prompt.describe_base()}",
                recycler=self.name,
                recycler_config=self.config,
            )
        return self.mapped(check_matrix("prompt", prompt, dim=self.source_dim)).to(torch.float32)

    def mapped(self, prompt: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`transform`'s map of a float64 ``[length, d_src]`` tensor, unchecked and differentiable;
        with ``state``, its :attr:`trainable` tensors in place of the fitted ones (training the map)."""
        fitted = {name: getattr(self, name) for name in state or {}}
        try:
            for name, value in (state or {}).items():
                setattr(self, name, value)
            out = self._transform(prompt)
        finally:
            for name, value in fitted.items():
                setattr(self, name, value)
        if self.match_norm:
            source_norm, target_norm = self._anchor_norms
            wanted = prompt.norm(dim=1, keepdim=True) * (target_norm / source_norm)
            out = out * wanted / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The fitted :attr:`trainable` tensors (what training the map on behaviour starts from)."""
        if not self.trainable:
            raise RecycleError(
                f"The {self.name!r} recycler's map cannot be trained on behaviour (train_map): use a recycler "
                "whose map is a tensor, e.g. linear."
            )
        if not self.is_fitted:
            raise RecycleError(f"Fit the {self.name!r} recycler before training its map on behaviour.")
        return {name: getattr(self, name) for name in self.trainable}

    def load_trained(self, state: Mapping[str, torch.Tensor], behaviour: dict[str, Any]) -> None:
        """Take trained values of the :attr:`trainable` tensors, and ``behaviour`` (how they were
        trained) into the recycler's config and lineage."""
        for name, fitted in self.trainable_state().items():
            setattr(self, name, state[name].detach().to("cpu", fitted.dtype).clone())
        self.behaviour = dict(behaviour)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``recycler.json`` and ``recycler.safetensors`` into directory ``path``."""
        if not self.is_fitted:
            raise RecycleError(f"Cannot save an unfitted {self.name!r} recycler: fit it first.")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self._state().items()}
        state["anchor_norms"] = self._anchor_norms
        save_file(state, str(path / STATE_FILE))
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "name": self.name,
            "config": self.config,
            "source_dim": self.source_dim,
            "target_dim": self.target_dim,
            "source_fingerprint": self.source_fingerprint,
            "target_fingerprint": self.target_fingerprint,
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    def load_state(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Restore a fitted state written by :meth:`save` (see ``load_recycler``)."""
        self.source_dim, self.target_dim = int(meta["source_dim"]), int(meta["target_dim"])
        self.source_fingerprint, self.target_fingerprint = (
            meta.get("source_fingerprint"),
            meta.get("target_fingerprint"),
        )
        self.behaviour = meta["config"].get("behaviour")
        self._anchor_norms = state.pop("anchor_norms")
        self._load_state(state)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        dims = f", {self.source_dim}->{self.target_dim}" if self.is_fitted else ""
        return f"{type(self).__name__}({options}{dims})"
