"""Initial values for a soft prompt, and the random-token prompt baseline.

The paper's three inits: ``random`` (uniform in [-0.5, 0.5]), ``vocab`` (rows sampled
from the embeddings of the 5,000 most frequent tokens) and ``class_labels`` (the label
words' embeddings first, then vocabulary samples). A random-token prompt (``vocab``
sampling on the *target* model) is also the baseline a recycled prompt must beat: it
shows what any prompt-shaped input of in-vocabulary rows does to accuracy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .errors import RecycleError

INIT_METHODS = ("random", "vocab", "class_labels")
RANDOM_SCALE = 0.5
VOCAB_LIMIT = 5000


def sample_vocab_rows(
    table: torch.Tensor,
    length: int,
    generator: torch.Generator,
    *,
    vocab_limit: int = VOCAB_LIMIT,
    exclude_ids: Collection[int] = (),
) -> torch.Tensor:
    """``length`` distinct rows drawn from the first ``vocab_limit`` rows of ``table``, skipping ``exclude_ids``."""
    candidates = torch.tensor([i for i in range(min(vocab_limit, table.shape[0])) if i not in set(exclude_ids)])
    if len(candidates) < length:
        raise RecycleError(f"Cannot sample {length} distinct vocabulary rows from {len(candidates)} candidates.")
    picked = candidates[torch.randperm(len(candidates), generator=generator)[:length]]
    return table[picked].detach().to(torch.float32).clone()


def initial_prompt(
    method: str,
    table: torch.Tensor,
    length: int,
    *,
    seed: int = 0,
    class_token_ids: Sequence[Sequence[int]] = (),
    exclude_ids: Collection[int] = (),
) -> torch.Tensor:
    """A ``[length, dim]`` starting prompt for tuning on a model with embedding ``table``."""
    if length <= 0:
        raise RecycleError(f"Prompt length must be positive, got {length}.")
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return (torch.rand(length, table.shape[1], generator=generator) * 2 - 1) * RANDOM_SCALE
    if method == "vocab":
        return sample_vocab_rows(table, length, generator, exclude_ids=exclude_ids)
    if method == "class_labels":
        labels = [table[list(ids)].float().mean(0) for ids in class_token_ids][:length]
        if not labels:
            raise RecycleError("class_labels init needs the verbalizers' token ids (class_token_ids).")
        rest = sample_vocab_rows(table, length - len(labels), generator, exclude_ids=exclude_ids)
        return torch.cat([torch.stack(labels).detach(), rest])
    raise RecycleError(f"Unknown prompt init {method!r}; choose one of {', '.join(INIT_METHODS)}.")


REGULARIZERS = ("none", "norm", "wayward")


def regularization_anchor(
    kind: str, table: torch.Tensor, length: int, text_ids: Sequence[int] = ()
) -> torch.Tensor | None:
    """Rows a tuned prompt is pulled toward (penalty ``γ·mean‖pᵢ − aᵢ‖²``), or None.

    ``norm``: zeros, a plain norm penalty. ``wayward``: the embeddings of a discrete task
    instruction (``text_ids``, repeated to ``length`` rows), the reference code's "wayward"
    regulariser: a prompt that stays near real token embeddings is one a vocabulary map
    has seen the like of.
    """
    if kind == "none":
        return None
    if kind == "norm":
        return torch.zeros(length, table.shape[1])
    if kind == "wayward":
        if not text_ids:
            raise RecycleError("The wayward regulariser needs the task's instruction text (task.instruction).")
        rows = [text_ids[i % len(text_ids)] for i in range(length)]
        return table[rows].detach().to(torch.float32).clone()
    raise RecycleError(f"Unknown prompt regularizer {kind!r}; choose one of {', '.join(REGULARIZERS)}.")
