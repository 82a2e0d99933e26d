"""``relative``: recycle a prompt through its relative representation (not in the paper).

After Wu et al. 2024, "Zero-Shot Continuous Prompt Transfer": describe each prompt row by
its cosine similarities to the anchor tokens in the source space, then search the target
space for rows with the same similarities to the same anchors. Only angles to anchors
transfer, so no map has to extrapolate to the large norms trained prompts have; each row's
length is carried over relative to the vocabulary's mean norm (as ``match_norm`` does).
The search starts from the Procrustes map and runs a fixed number of seeded Adam steps.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Recycler
from .procrustes import ProcrustesRecycler


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class RelativeRecycler(Recycler):
    """Match cosine-similarity profiles over the anchors.

    Args:
        steps, lr: Adam steps and learning rate of the search in the target space.
        seed: fixes the search (it starts from a deterministic map; the seed only matters
            for ties).
    """

    name = "relative"
    needs_full_rank = False

    def __init__(self, *, steps: int = 300, lr: float = 0.01, seed: int = 0, match_norm: bool = False) -> None:
        super().__init__(match_norm=match_norm)
        self.steps, self.lr, self.seed = int(steps), float(lr), int(seed)
        self.source_unit: torch.Tensor | None = None
        self.target_unit: torch.Tensor | None = None
        self.start = ProcrustesRecycler()

    def options(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "seed": self.seed}

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.source_unit, self.target_unit = _unit(source), _unit(target)
        self.start.fit(source, target)
        self._norm_ratio = target.norm(dim=1).mean() / source.norm(dim=1).mean()

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        wanted = _unit(prompt) @ self.source_unit.T  # [length, anchors]
        rows = self.start.transform(prompt).double().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([rows], lr=self.lr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for _ in range(self.steps):
                loss = ((_unit(rows) @ self.target_unit.T - wanted) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        lengths = prompt.norm(dim=1, keepdim=True) * self._norm_ratio
        return (_unit(rows) * lengths).detach()

    def _state(self) -> dict[str, torch.Tensor]:
        state = {
            "source_unit": self.source_unit,
            "target_unit": self.target_unit,
            "norm_ratio": self._norm_ratio.reshape(1),
        }
        state.update({f"start.{k}": v for k, v in self.start._state().items()})
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.source_unit, self.target_unit = state["source_unit"], state["target_unit"]
        self._norm_ratio = state["norm_ratio"][0]
        self.start._load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("start.")})
        self.start.source_dim, self.start.target_dim = self.source_unit.shape[1], self.target_unit.shape[1]
