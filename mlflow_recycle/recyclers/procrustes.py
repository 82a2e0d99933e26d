"""``procrustes``: an orthogonal map between centred spaces, with the scale restored.

Not in the paper. A least-squares map fitted on vocabulary rows is free to distort
directions the vocabulary barely uses, which is where trained prompts live; a rotation
(semi-orthogonal when the dims differ) keeps every angle and length, so it cannot blow up
or collapse those directions. ``W = U Vᵀ`` from the SVD of ``Sᶜᵀ Tᶜ`` (the classic
orthogonal Procrustes solution); the optimal isotropic scale ``s = tr(Σ) / ||Sᶜ||²``
restores the target's scale, and the target mean is added back.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Recycler


class ProcrustesRecycler(Recycler):
    """Orthogonal Procrustes with centring and isotropic scale.

    Args:
        scale: restore the scale between the spaces (else ``s = 1``).
        center: remove each space's mean before rotating and add the target mean after.
    """

    name = "procrustes"
    needs_full_rank = False

    def __init__(self, *, scale: bool = True, center: bool = True, match_norm: bool = False) -> None:
        super().__init__(match_norm=match_norm)
        self.scale, self.center = bool(scale), bool(center)
        self.rotation: torch.Tensor | None = None
        self.source_mean: torch.Tensor | None = None
        self.target_mean: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale, "center": self.center}

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        if self.center:
            self.source_mean, self.target_mean = source.mean(dim=0), target.mean(dim=0)
        else:
            self.source_mean = torch.zeros(source.shape[1], dtype=source.dtype)
            self.target_mean = torch.zeros(target.shape[1], dtype=target.dtype)
        s, t = source - self.source_mean, target - self.target_mean
        u, sigma, vh = torch.linalg.svd(s.T @ t, full_matrices=False)
        self.rotation = u @ vh
        factor = sigma.sum() / (s * s).sum() if self.scale else torch.tensor(1.0, dtype=s.dtype)
        self.factor = factor.reshape(1)

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return (prompt - self.source_mean) @ self.rotation * self.factor + self.target_mean

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "rotation": self.rotation,
            "source_mean": self.source_mean,
            "target_mean": self.target_mean,
            "factor": self.factor,
        }

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.rotation, self.factor = state["rotation"], state["factor"]
        self.source_mean, self.target_mean = state["source_mean"], state["target_mean"]
