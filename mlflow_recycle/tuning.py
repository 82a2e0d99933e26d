"""Tuning a prompt from a composed config: what the job, the benchmarks and the policy's tests share.

``tune_prompt(cfg, side, data, name)`` tunes a prompt on one model with the config's recipe
(``conf/prompt``, ``conf/trainer``, ``conf/module``), keeping the best validation's prompt.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_modules import FitOutcome, PromptTuningModule, TextClassificationDataModule, fit_prompt

from .anchors import embedding_table
from .config import instantiate_partial
from .evaluation import task_data
from .models import LoadedModel
from .prompt import SoftPrompt
from .prompt_init import initial_prompt, regularization_anchor
from .task import TaskSpec

log = logging.getLogger(__name__)


def task_spec(cfg: DictConfig) -> TaskSpec:
    return TaskSpec(
        cfg.name,
        cfg.template,
        tuple(cfg.verbalizers),
        data=str(cfg.data),
        max_length=cfg.max_length,
        truncation_side=cfg.truncation_side,
        length_normalize=cfg.length_normalize,
        text_field=str(cfg.get("text_field", "text")),
        label_field=str(cfg.get("label_field", "label")),
        header=cfg.get("header", True),
        labels=tuple(cfg.get("labels") or ()),
        validation_min_words=cfg.get("validation_min_words", 0),
        train_min_words=cfg.get("train_min_words", 0),
    )


def data_module(side: LoadedModel, spec: TaskSpec, cfg: DictConfig) -> TextClassificationDataModule:
    """The task's data for ``side``: ``conf/data`` built with ``_target_`` on ``side``'s tokenizer."""
    return task_data(side, spec, prompt_length=cfg.prompt.length, datamodule=instantiate(cfg.data))


def tune_prompt(
    cfg: DictConfig, side: LoadedModel, data: TextClassificationDataModule, name: str, logger: Any = False
) -> tuple[SoftPrompt, FitOutcome]:
    """Tune a prompt on ``side`` with ``cfg``'s recipe (apply a model's ``recipe:`` first:
    :func:`~mlflow_recycle.config.with_recipe`). The best validation's prompt is kept, chosen by the
    gate's metric; the training curve goes to ``logger`` as ``{name}/...``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    table = embedding_table(side.model)
    init = initial_prompt(
        cfg.prompt.init, table, cfg.prompt.length, seed=cfg.seed,
        class_token_ids=data.encoder.verbalizer_ids, exclude_ids=side.tokenizer.all_special_ids,
    )  # fmt: skip
    instruction = cfg.task.get("instruction") or ""
    instruction_ids = side.tokenizer(instruction, add_special_tokens=False)["input_ids"] if instruction else ()
    anchor = regularization_anchor(cfg.prompt.regularizer, table, cfg.prompt.length, instruction_ids)
    module: PromptTuningModule = instantiate(
        cfg.module,
        optimizer=instantiate_partial(cfg.prompt.optimizer, "prompt.optimizer"),
        scheduler=instantiate_partial(cfg.prompt.get("scheduler"), "prompt.scheduler"),
    )(side.model, init, length_normalize=data.encoder.task.length_normalize, name=name, anchor=anchor)
    steps, metric = cfg.trainer.max_steps, cfg.get("policy", {}).get("gate", {}).get("metric", "accuracy")
    log.info("Tuning a %d-token prompt on %s for %d steps", cfg.prompt.length, side.name, steps)
    validates = cfg.trainer.get("limit_val_batches") != 0
    outcome = fit_prompt(
        module, instantiate(cfg.trainer, _partial_=True), steps=steps, metric=metric, datamodule=data, logger=logger,
        eval_every=cfg.trainer.val_check_interval if validates else None,
    )  # fmt: skip
    if outcome.best_step is not None:
        log.info("Best validation %s %.4f at step %d of %d: keeping that prompt", metric, outcome.score,
                 outcome.best_step, outcome.steps)  # fmt: skip
    prompt = SoftPrompt(
        outcome.prompt,
        base_model=side.name,
        base_model_uri=side.uri,
        tokenizer_fingerprint=side.fingerprint,
        task_type="SEQ_2_SEQ_LM" if side.seq2seq else "CAUSAL_LM",
        init=cfg.prompt.init,
        task=data.encoder.task,
        cost={
            "steps": outcome.steps,
            "seconds": outcome.seconds,
            "flops": outcome.compute.flops,
            "parameters": side.parameters,
        },  # fmt: skip
    )
    return prompt, outcome
