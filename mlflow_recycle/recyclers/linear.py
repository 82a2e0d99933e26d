"""``linear``: the paper's v2v-lin recycler.

Least squares ``W = argmin ||S W - T||² + λ||W||²`` over the anchors, then the recycled
prompt is ``P W`` (with an unpenalised bias column when ``bias=True``). ``ridge="auto"``
picks λ on held-out anchors (a tenth, seeded) from a log-spaced grid scaled to the data.
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
        ridge: L2 penalty λ on ``W``; 0 is plain least squares as in the paper; ``"auto"``
            chooses it on held-out anchors.
        bias: also fit a translation (the difference of the two spaces' centres).
    """

    name = "linear"
    trainable = ("weight",)
    #: λ candidates for ``ridge="auto"``, as multiples of the mean squared anchor norm.
    GRID = (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)

    def __init__(self, *, ridge: float | str = 0.0, bias: bool = False, match_norm: bool = False) -> None:
        super().__init__(match_norm=match_norm)
        if ridge != "auto" and (isinstance(ridge, str) or ridge < 0):
            raise RecycleError(f"linear recycler: ridge must be a number >= 0 or 'auto', got {ridge!r}.")
        self.ridge = ridge if ridge == "auto" else float(ridge)
        self.bias = bool(bias)
        self.weight: torch.Tensor | None = None
        #: The λ used (chosen on held-out anchors when ridge is "auto").
        self.chosen_ridge: float | None = None

    def options(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "bias": self.bias}

    def _solve(self, x: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
        if ridge == 0:
            return torch.linalg.lstsq(x, target, driver="gelsd").solution
        penalty = torch.eye(x.shape[1], dtype=x.dtype) * ridge
        if self.bias:
            penalty[-1, -1] = 0.0  # never shrink the translation
        return torch.linalg.solve(x.T @ x + penalty, x.T @ target)

    def _choose_ridge(self, x: torch.Tensor, target: torch.Tensor) -> float:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        held, kept = order[: x.shape[0] // 10], order[x.shape[0] // 10 :]
        scale = float((x[kept] ** 2).sum(1).mean())
        errors = {}
        for factor in self.GRID:
            weight = self._solve(x[kept], target[kept], factor * scale)
            errors[factor * scale] = float(((x[held] @ weight - target[held]) ** 2).mean())
        return min(errors, key=errors.get)

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        x = _with_ones(source) if self.bias else source
        self.chosen_ridge = self._choose_ridge(x, target) if self.ridge == "auto" else self.ridge
        self.weight = self._solve(x, target, self.chosen_ridge)

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return (_with_ones(prompt) if self.bias else prompt) @ self.weight

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "chosen_ridge": torch.tensor([self.chosen_ridge], dtype=torch.float64)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight, self.chosen_ridge = state["weight"], float(state["chosen_ridge"][0])
