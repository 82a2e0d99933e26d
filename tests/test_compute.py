"""Compute meters: every prompted pass counted by its positions and parameters, training passes twice."""

from __future__ import annotations

import torch

from mlflow_recycle.compute import metered
from mlflow_recycle.prompted_lm import PromptedLM


def test_a_pass_counts_its_positions_and_flops_in_every_open_meter(load_model):
    model, _ = load_model("small-a")
    lm = PromptedLM(model)
    embedding = model.get_input_embeddings().weight
    # tied embeddings: the body is every parameter but the table, which the head reuses at kept positions only
    assert lm.body_parameters == sum(p.numel() for p in model.parameters()) - embedding.numel()
    assert lm.head_parameters == embedding.numel()
    ids = torch.randint(2, 100, (3, 7))
    mask = torch.ones_like(ids)
    prompt = torch.zeros(5, lm.dim)
    positions = 3 * (5 + 7)  # the prompt rows are computed too
    with metered() as outer:
        with torch.no_grad():
            lm.log_probs(prompt, ids, mask, keep=1)
        with metered() as inner:
            lm.log_probs(prompt.clone().requires_grad_(True), ids, mask, keep=2)  # a training pass
    lm.log_probs(prompt, ids, mask, keep=1)  # no meter open: counted nowhere
    forward = 2.0 * (lm.body_parameters * positions + lm.head_parameters * 3 * 1)
    trained = 2 * 2.0 * (lm.body_parameters * positions + lm.head_parameters * 3 * 2)  # backward: the same again
    assert (inner.forward, inner.backward, inner.flops) == (positions, positions, trained)
    assert (outer.forward, outer.backward, outer.flops) == (2 * positions, positions, forward + trained)
