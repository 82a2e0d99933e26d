"""Prompts batched through one frozen model: a stack of K prompts scores, loses and tunes as each
prompt does alone (issue 50), within float tolerance, with each prompt's stop unchanged."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_modules import (
    PromptTuningModule,
    StackedPromptTuningModule,
    TextClassificationDataModule,
    adamw,
    fit_prompt,
    fit_prompts,
)
from mlflow_recycle import RecycleError
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import PromptedLM, TaskEncoder
from tests.test_lightning import sst2, trainer


def stack_of(model, k: int, length: int = 5) -> torch.Tensor:
    table = model.get_input_embeddings().weight
    return torch.stack([initial_prompt("random", table, length, seed=seed) for seed in range(k)])


def test_a_stack_of_prompts_scores_and_loses_as_each_prompt_alone(load_model, data_dir):
    model, tokenizer = load_model("small-a")
    encoder = TaskEncoder(tokenizer, sst2(data_dir))
    contexts = encoder.contexts(["a fine film", "the plot is a mess from start to end", "dull", "warm and wise"])
    scoring, training = encoder.scoring_batch(contexts), encoder.training_batch(contexts, [1, 0, 0, 1])
    scoring["labels"] = torch.tensor([1, 0, 0, 1])
    lm, stack = PromptedLM(model), stack_of(model, 3)
    with torch.no_grad():
        scores = lm.class_scores(stack, scoring)
        assert scores.shape == (3, 4, 2)
        for k, prompt in enumerate(stack):
            torch.testing.assert_close(scores[k], lm.class_scores(prompt, scoring), atol=1e-4, rtol=1e-4)
        alone = torch.stack([lm.class_loss(p, scoring) for p in stack])
        torch.testing.assert_close(lm.class_loss(stack, scoring), alone, atol=1e-5, rtol=1e-5)
        alone = torch.stack([lm.loss(p, training) for p in stack])
        torch.testing.assert_close(lm.loss(stack, training), alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0], scores[1])  # the prompts differ, so a mix-up would show


@pytest.mark.parametrize("objective", ["classes", pytest.param("lm", marks=pytest.mark.slow)])
def test_stacked_tuning_equals_each_prompt_tuned_alone(load_model, data_dir, objective):
    """Three prompts, three stops: the first passes its bar at the first check, the second never beats
    its start and runs out of patience, the third runs on. Stacked, each gets the prompt, steps, best
    step, score and stop it gets alone."""
    model, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(
        TaskEncoder(tokenizer, sst2(data_dir)), batch_size=8, limit_train=64, limit_val=32, seed=0
    )
    stack = stack_of(model, 3)
    thresholds, starts = [-1.0, None, None], [None, 1.0, None]
    settings = dict(steps=6, eval_every=2, patience=2, metric="accuracy", datamodule=data)
    make = partial(trainer, enable_progress_bar=False)
    options = dict(optimizer=adamw(lr=0.05), objective=objective, name="retune")
    alone = [
        fit_prompt(
            PromptTuningModule(model, prompt, **options), make, stop_above_score=bar, start_score=start,
            **settings,
        )
        for prompt, bar, start in zip(stack, thresholds, starts, strict=True)
    ]  # fmt: skip
    stacked = fit_prompts(
        StackedPromptTuningModule(model, stack, **options), make, thresholds=thresholds,
        start_scores=starts, **settings,
    )  # fmt: skip
    assert len({o.steps for o in alone}) > 1  # the prompts stop at different steps
    for one, many in zip(alone, stacked, strict=True):
        assert (many.steps, many.best_step, many.stopped_early, many.plateaued) == (
            one.steps, one.best_step, one.stopped_early, one.plateaued,
        )  # fmt: skip
        assert many.score == pytest.approx(one.score, abs=1e-6)
        torch.testing.assert_close(many.prompt, one.prompt, atol=1e-4, rtol=1e-4)
        assert many.compute.flops > 0
    assert stacked[0].stopped_early and stacked[1].plateaued and stacked[1].steps == 4
    assert not torch.allclose(stacked[2].prompt, stack[2])  # it trained


def test_a_stack_is_k_prompts_of_one_shape(load_model):
    model, _ = load_model("small-a")
    with pytest.raises(RecycleError, match=r"A stack of prompts is \[K, length, dim\]"):
        StackedPromptTuningModule(model, stack_of(model, 1)[0])
