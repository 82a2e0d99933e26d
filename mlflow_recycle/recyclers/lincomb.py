"""``lincomb``: the paper's lin-comb recycler.

Each prompt row is written as the minimum-norm least-squares combination of the source
anchor embeddings, and the same combination of the target anchor embeddings is the
recycled row: ``c = argmin ||c S - p||``, recycled ``= c T``. Algebraically this is
``P S⁺ T``, the same map as unregularised ``linear`` (``W = S⁺ T``); it is kept as its own
recycler because it is the paper's formulation and exposes the combination weights.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Recycler


class LinCombRecycler(Recycler):
    """Recycle each prompt row as a combination of anchor tokens.

    Args:
        rcond: relative cut-off for small singular values of the source anchors.
    """

    name = "lincomb"

    def __init__(self, *, rcond: float = 1e-10, match_norm: bool = False) -> None:
        super().__init__(match_norm=match_norm)
        self.rcond = float(rcond)
        self.source_anchors: torch.Tensor | None = None
        self.target_anchors: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"rcond": self.rcond}

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.source_anchors, self.target_anchors = source, target

    def coefficients(self, prompt: torch.Tensor) -> torch.Tensor:
        """Combination weights ``[length, n_anchors]`` of each prompt row over the source anchors."""
        return prompt.to(torch.float64) @ torch.linalg.pinv(self.source_anchors, rtol=self.rcond)

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.coefficients(prompt) @ self.target_anchors

    def _state(self) -> dict[str, torch.Tensor]:
        return {"source_anchors": self.source_anchors, "target_anchors": self.target_anchors}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.source_anchors, self.target_anchors = state["source_anchors"], state["target_anchors"]
