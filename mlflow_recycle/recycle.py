"""Fitting a recycler between two Hugging Face models: anchors in, fitted map out.

This is the only place where models meet recyclers; everything here is pure torch and
transformers (no MLflow, no Lightning), so it can be used from a notebook:

    recycler = fit_recycler("linear", source_model, source_tok, target_model, target_tok)
    recycled = recycler.transform(prompt).replace(base_model="my-llm", base_model_version="2")
"""

from __future__ import annotations

import logging
from typing import Any

from .anchors import DEFAULT_OFFSET, DEFAULT_SIZE, embedding_table, find_anchors
from .recyclers import Recycler, get_recycler
from .vocab import tokenizer_fingerprint

log = logging.getLogger(__name__)


def fit_recycler(
    recycler: str | Recycler,
    source_model: Any,
    source_tokenizer: Any,
    target_model: Any,
    target_tokenizer: Any,
    *,
    anchor_offset: int = DEFAULT_OFFSET,
    anchor_size: int = DEFAULT_SIZE,
    **recycler_config: Any,
) -> Recycler:
    """Find anchors between the two models and fit ``recycler`` (a name or an instance) on them.

    The fitted recycler's ``anchor_stats`` says how many anchors were found and used
    (``{"found": n, "used": m}``), for the caller to log.
    """
    if isinstance(recycler, str):
        recycler = get_recycler(recycler, **recycler_config)
    anchors = find_anchors(source_tokenizer, target_tokenizer, offset=anchor_offset, size=anchor_size)
    source, target = anchors.embeddings(embedding_table(source_model), embedding_table(target_model))
    log.info(
        "%s recycler on %d of %d anchors found (%s tokenizer), dim %d -> %d",
        f"Fitting the {recycler.name}" if recycler.learns else f"The {recycler.name} (nothing to fit)",
        len(anchors),
        anchors.found,
        "same" if anchors.same_tokenizer else "cross",
        source.shape[1],
        target.shape[1],
    )
    fitted = recycler.fit(
        source,
        target,
        source_fingerprint=tokenizer_fingerprint(source_tokenizer),
        target_fingerprint=tokenizer_fingerprint(target_tokenizer),
    )
    # For the run: how many anchor tokens the two vocabularies share, and how many the map was fitted on.
    fitted.anchor_stats = {"found": anchors.found, "used": len(anchors)}
    return fitted
