"""``mlp``: the paper's v2v-nn recycler.

A two-layer network ``Linear(d_src, 4·d_tgt) → ReLU → Linear(4·d_tgt, d_tgt)`` trained to
map each anchor's source embedding to its target embedding (MSE, Adam 3e-4, batches of
50, 25 epochs, as in the paper). Seeded: the same anchors and seed give bit-identical
weights on the same machine and thread count.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .base import Recycler

log = logging.getLogger(__name__)


class MLPRecycler(Recycler):
    """Non-linear vocab-to-vocab map.

    Args:
        hidden_multiplier: hidden width as a multiple of the target dim (paper: 4).
        lr, batch_size, epochs: Adam training schedule (paper: 3e-4, 50, 25).
        seed: seeds initialisation and shuffling.
    """

    name = "mlp"

    def __init__(
        self,
        *,
        hidden_multiplier: int = 4,
        lr: float = 3e-4,
        batch_size: int = 50,
        epochs: int = 25,
        seed: int = 0,
        match_norm: bool = False,
    ) -> None:
        super().__init__(match_norm=match_norm)
        self.hidden_multiplier, self.lr = int(hidden_multiplier), float(lr)
        self.batch_size, self.epochs, self.seed = int(batch_size), int(epochs), int(seed)
        self.net: nn.Sequential | None = None
        #: Mean training loss of each epoch, for checking that fitting converged.
        self.losses: list[float] = []

    def options(self) -> dict[str, Any]:
        return {
            "hidden_multiplier": self.hidden_multiplier,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
        }

    def _build(self, source_dim: int, target_dim: int) -> nn.Sequential:
        hidden = self.hidden_multiplier * target_dim
        return nn.Sequential(nn.Linear(source_dim, hidden), nn.ReLU(), nn.Linear(hidden, target_dim))

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        x, y = source.float(), target.float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self._build(x.shape[1], y.shape[1])
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr)
        self.losses = []
        for epoch in range(self.epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            total = 0.0
            for start in range(0, x.shape[0], self.batch_size):
                batch = order[start : start + self.batch_size]
                loss = nn.functional.mse_loss(net(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            self.losses.append(total / x.shape[0])
            if epoch % 5 == 4 or epoch == self.epochs - 1:  # a line in log files too, where no bar shows
                log.info("mlp recycler: epoch %d/%d, anchor MSE %.4g", epoch + 1, self.epochs, self.losses[-1])
        self.net = net.eval().requires_grad_(False)

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.net(prompt.float()).double()

    def _state(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        source_dim, target_dim = state["0.weight"].shape[1], state["2.weight"].shape[0]
        self.net = self._build(source_dim, target_dim)
        self.net.load_state_dict(state)
        self.net.eval().requires_grad_(False)
