"""``linear``: the paper's v2v-lin recycler.

Least squares ``W = argmin ||S W - T||² + λ||W||²`` over the anchors, then the recycled
prompt is ``P W`` (with an unpenalised bias column when ``bias=True``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RecycleError
from .base import Recycler


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


class LinearRecycler(Recycler):
    """Vocab-to-vocab linear map fitted by (ridge) least squares.

    Args:
        ridge: L2 penalty λ on ``W``; 0 is plain least squares as in the paper.
        bias: also fit a translation (the difference of the two spaces' centres).
    """

    name = "linear"

    def __init__(self, *, ridge: float = 0.0, bias: bool = False, match_norm: bool = False) -> None:
        super().__init__(match_norm=match_norm)
        if ridge < 0:
            raise RecycleError(f"linear recycler: ridge must be >= 0, got {ridge}.")
        self.ridge = float(ridge)
        self.bias = bool(bias)
        self.weight: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "bias": self.bias}

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        x = _with_ones(source) if self.bias else source
        if self.ridge == 0:
            self.weight = torch.linalg.lstsq(x, target, driver="gelsd").solution
            return
        penalty = torch.eye(x.shape[1], dtype=x.dtype) * self.ridge
        if self.bias:
            penalty[-1, -1] = 0.0  # never shrink the translation
        self.weight = torch.linalg.solve(x.T @ x + penalty, x.T @ target)

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return (_with_ones(prompt) if self.bias else prompt) @ self.weight

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = state["weight"]
