"""Anchor vocabularies: the token pairs a recycler is fitted on.

A recycler learns a map from the source model's embedding space to the target's from
pairs of embeddings of the *same* token in both models. With one tokenizer the pairs are
the same ids; across tokenizers they are tokens whose surface string matches once each
scheme's word-start marker (``Ġ``, ``▁``, WordPiece's unmarked start vs ``##``) is
normalised away.

Following the prompt-recycling paper's code, only alphabetic whole-word tokens are used,
in the source vocabulary's order (frequency order for BPE merges and unigram scores),
skipping the ``offset`` most frequent (function words and fragments whose embeddings
carry little meaning) and keeping the next ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import RecycleError
from .vocab import HasVocab, surface_form, tokenizer_fingerprint, uses_wordpiece

DEFAULT_OFFSET = 1000
DEFAULT_SIZE = 4000
#: Below this many anchors a map between two embedding spaces is not worth fitting.
DEFAULT_MIN_ANCHORS = 500


@dataclass(frozen=True)
class Anchors:
    """Paired token ids: ``source_ids[i]`` and ``target_ids[i]`` both spell ``tokens[i]``."""

    source_ids: torch.Tensor
    target_ids: torch.Tensor
    tokens: tuple[str, ...]
    same_tokenizer: bool
    #: Candidate anchors found (alphabetic whole words in both vocabularies), before
    #: ``offset`` and ``size`` select the ``len(anchors)`` used.
    found: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def embeddings(self, source_table: torch.Tensor, target_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchors' rows of two embedding tables: ``(S [n, d_src], T [n, d_tgt])``."""
        for side, table, ids in (("source", source_table, self.source_ids), ("target", target_table, self.target_ids)):
            if int(ids.max()) >= table.shape[0]:
                raise RecycleError(
                    f"Anchor id {int(ids.max())} is outside the {side} embedding table ({table.shape[0]} rows): "
                    f"the anchors were built for another {side} tokenizer. Rebuild them with find_anchors."
                )
        return source_table[self.source_ids].float(), target_table[self.target_ids].float()


def _whole_words(vocab: dict[str, int]) -> dict[str, int]:
    """Alphabetic whole-word tokens by surface form, keeping each form's lowest id."""
    wordpiece = uses_wordpiece(vocab)
    words: dict[str, int] = {}
    for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
        text, word_start = surface_form(token, wordpiece)
        if word_start and text.isalpha() and text not in words:
            words[text] = token_id
    return words


def find_anchors(
    source_tokenizer: HasVocab,
    target_tokenizer: HasVocab,
    *,
    offset: int = DEFAULT_OFFSET,
    size: int = DEFAULT_SIZE,
    min_anchors: int = DEFAULT_MIN_ANCHORS,
) -> Anchors:
    """Anchor pairs between two tokenizers (the same one or different ones).

    Raises:
        RecycleError: fewer than ``min_anchors`` pairs survive the filter, e.g. for two
            tokenizers of different languages or scripts.
    """
    if offset < 0 or size <= 0:
        raise RecycleError(f"Anchor offset must be >= 0 and size > 0, got offset={offset}, size={size}.")
    source_vocab = dict(source_tokenizer.get_vocab())
    target_vocab = dict(target_tokenizer.get_vocab())
    same = tokenizer_fingerprint(source_tokenizer) == tokenizer_fingerprint(target_tokenizer)
    source_words = _whole_words(source_vocab)
    target_words = source_words if same else _whole_words(target_vocab)
    shared = [word for word in source_words if word in target_words]  # source order
    selected = shared[offset : offset + size]
    if len(selected) < min_anchors:
        if len(shared) < min_anchors:
            hint = (
                "The vocabularies share too little text (another language or script?): "
                "recycling between them is not supported."
            )
        elif size < min_anchors:
            hint = f"Raise anchors.size to at least {min_anchors}."
        else:
            hint = f"Lower anchors.offset to at most {len(shared) - min_anchors}."
        raise RecycleError(
            f"Only {len(selected)} anchor tokens between the two tokenizers ({len(shared)} alphabetic whole words in "
            f"both, minus offset {offset}, at most size {size}); at least {min_anchors} are needed to fit a map. "
            + hint
        )
    return Anchors(
        source_ids=torch.tensor([source_words[w] for w in selected], dtype=torch.long),
        target_ids=torch.tensor([target_words[w] for w in selected], dtype=torch.long),
        tokens=tuple(selected),
        same_tokenizer=same,
        found=len(shared),
    )


def embedding_table(model: Any) -> torch.Tensor:
    """A Hugging Face model's input-embedding matrix ``[vocab, dim]`` as detached float32."""
    try:
        weight = model.get_input_embeddings().weight
    except AttributeError as exc:
        raise RecycleError(
            f"{type(model).__name__} has no get_input_embeddings(): pass a Hugging Face transformers model."
        ) from exc
    return weight.detach().to("cpu", torch.float32)
