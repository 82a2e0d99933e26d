"""Vocabulary identity and surface forms, shared by prompt checks and anchor search.

A soft prompt lives in the input-embedding space of one vocabulary. Two checks need the
vocabulary itself rather than the model: whether a prompt fits a model at all (the
fingerprint), and which tokens of two different tokenizers denote the same word (the
surface form, with each scheme's word-start marker normalised away).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Protocol

#: Word-start markers of byte-level BPE (GPT-2, Llama 3) and SentencePiece (T5, Llama 2).
WORD_START_MARKERS = ("Ġ", "▁")
#: Continuation marker of WordPiece (BERT): a token *without* it starts a word.
WORDPIECE_CONTINUATION = "##"


class HasVocab(Protocol):
    def get_vocab(self) -> Mapping[str, int]: ...


def tokenizer_fingerprint(tokenizer: HasVocab) -> str:
    """A stable hash of the token → id mapping.

    Two tokenizers with the same fingerprint map every string to the same ids, so a
    prompt trained with one fits a model using the other. Special-token settings and
    normalisers are left out on purpose: they change how text is split, not what an
    embedding row means.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def uses_wordpiece(vocab: Mapping[str, int]) -> bool:
    """True when continuation pieces are marked (``##ing``) instead of word starts."""
    has_continuation = any(t.startswith(WORDPIECE_CONTINUATION) for t in vocab)
    has_word_start = any(t.startswith(WORD_START_MARKERS) for t in vocab)
    return has_continuation and not has_word_start


def surface_form(token: str, wordpiece: bool) -> tuple[str, bool]:
    """The token's text without its marker, and whether it starts a word.

    ``"Ġgreat"``, ``"▁great"`` and WordPiece ``"great"`` all give ``("great", True)``;
    ``"##ing"`` and BPE ``"ing"`` give ``("ing", False)``.
    """
    for marker in WORD_START_MARKERS:
        if token.startswith(marker):
            return token[len(marker) :], True
    if wordpiece:
        if token.startswith(WORDPIECE_CONTINUATION):
            return token[len(WORDPIECE_CONTINUATION) :], False
        return token, True
    return token, False
