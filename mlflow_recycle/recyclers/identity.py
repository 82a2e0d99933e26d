"""``identity``: keep the prompt as it is.

For a model update that kept the embedding space (continued training of the same model,
same tokenizer and width), where any fitted map only adds noise. Also the baseline that
every other recycler must beat on such an update.
"""

from __future__ import annotations

import torch

from ..errors import IncompatibleModelError
from .base import Recycler


class IdentityRecycler(Recycler):
    """The identity map; requires equal source and target dims."""

    name = "identity"
    needs_full_rank = False
    learns = False

    def _fit(self, source: torch.Tensor, target: torch.Tensor) -> None:
        if source.shape[1] != target.shape[1]:
            raise IncompatibleModelError(
                f"The identity recycler needs equal embedding dims, got source {source.shape[1]} and target "
                f"{target.shape[1]}: between models of different width use linear, procrustes or another "
                "fitted recycler."
            )

    def _transform(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt.clone()

    def _state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass
