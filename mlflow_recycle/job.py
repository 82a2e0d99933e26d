"""The jobs behind ``python -m mlflow_recycle`` and the MLproject entry points.

``main``: tune a prompt on the source model (or take ``prompt_uri``), recycle it to the
target model, and evaluate it there next to the target's own baselines (zero-shot, a
random-token prompt, optionally a prompt re-tuned on the target), logging everything to
one MLflow run with the verdict ``success = recycled > max(zero-shot, random prompt)``.
``tune``, ``recycle`` and ``evaluate`` run one step of it.

Everything that can be checked before training is checked first (recycler, task,
verbalizers, data, prompt fit, sequence lengths), so a typo never costs a training run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lightning as L
import mlflow
import torch
from hydra.utils import instantiate
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig, OmegaConf

from lightning_modules import PromptTuningModule, RankClassificationModule, TextClassificationDataModule

from . import registry
from .anchors import embedding_table
from .charts import accuracy_chart
from .errors import RecycleError
from .prompt import SoftPrompt
from .prompt_init import initial_prompt, sample_vocab_rows
from .prompted_lm import TaskEncoder
from .recycle import fit_recycler
from .recyclers import Recycler, get_recycler
from .task import TaskSpec
from .tracking import configure, flatten, is_rank_zero, job_run, lightning_logger
from .vocab import tokenizer_fingerprint

log = logging.getLogger(__name__)
# Lightning announces its hardware and tips for every Trainer; the jobs create many.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

JOBS = ("main", "tune", "recycle", "evaluate")


# ---------------------------------------------------------------------- models and data
@dataclass
class LoadedModel:
    """A frozen Hugging Face model with its tokenizer, as named in ``conf/model``."""

    name: str
    path: str
    model: Any
    tokenizer: Any
    registered_name: str

    @property
    def seq2seq(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def dim(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load_model(cfg: DictConfig) -> LoadedModel:
    """Load ``cfg.path`` (a local directory or a hub id) as a frozen eval-mode model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(cfg.path)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(cfg.path, dtype=getattr(torch, cfg.get("dtype", "float32")))
        tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    except (OSError, ValueError) as exc:
        raise RecycleError(
            f"Cannot load model {cfg.name!r} from {cfg.path!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Check the model config's path: local models need ../shared beside the checkout "
            "(or MLFLOW_RECYCLE_SHARED), hub ids need network access."
        ) from exc
    log.info("Loaded %s from %s (dim %d)", cfg.name, cfg.path, int(model.get_input_embeddings().weight.shape[1]))
    registered = cfg.get("registered_name") or cfg.name
    return LoadedModel(cfg.name, str(cfg.path), model.eval().requires_grad_(False), tokenizer, registered)


def task_spec(cfg: DictConfig) -> TaskSpec:
    return TaskSpec(
        cfg.name,
        cfg.template,
        tuple(cfg.verbalizers),
        data=str(cfg.data),
        max_length=cfg.max_length,
        truncation_side=cfg.truncation_side,
        length_normalize=cfg.length_normalize,
    )


def data_module(side: LoadedModel, spec: TaskSpec, cfg: DictConfig) -> TextClassificationDataModule:
    """The task tokenised for ``side``, checked against its context window."""
    task = cfg.task
    needed = task.max_length + cfg.prompt.length
    if side.max_positions is not None and needed > side.max_positions:
        raise RecycleError(
            f"task.max_length={task.max_length} plus prompt.length={cfg.prompt.length} is {needed} positions, "
            f"more than {side.name} supports ({side.max_positions}): lower task.max_length."
        )
    encoder = TaskEncoder(side.tokenizer, spec, seq2seq=side.seq2seq)
    return TextClassificationDataModule(
        encoder,
        batch_size=task.batch_size,
        eval_batch_size=task.eval_batch_size,
        limit_train=task.limit_train,
        limit_val=task.limit_val,
        limit_test=task.limit_test,
        seed=cfg.seed,
    )


# ---------------------------------------------------------------------- steps
@dataclass
class Context:
    """What the steps share: config, run id (rank 0 only) and timings."""

    cfg: DictConfig
    run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: Registered base-model versions by model name (rank 0, when mlflow.register is on).
    bases: dict[str, ModelVersion] = field(default_factory=dict)

    def trainer(self, tuning: bool = False) -> L.Trainer:
        logger = lightning_logger(self.run_id) if tuning else False
        return instantiate(self.cfg.trainer, logger=logger)

    def splits(self) -> list[str]:
        return [str(s) for s in self.cfg.eval_splits]

    def register_bases(self, *sides: LoadedModel) -> None:
        """Find or register each side's base-model version, so prompts can be tied to it."""
        if is_rank_zero() and self.cfg.mlflow.register:
            for side in sides:
                self.bases[side.name] = registry.ensure_base_model(side.path, side.registered_name)

    def tied(self, prompt: SoftPrompt, side: LoadedModel) -> SoftPrompt:
        base = self.bases.get(side.name)
        return registry.tie(prompt, base) if base else prompt

    def publish(self, prompt: SoftPrompt, name: str, register: bool = True) -> str | None:
        """Log ``prompt`` as model ``name`` of the run (rank 0); register it when asked. Returns its URI."""
        if not is_rank_zero():
            return None
        registered = self.cfg.mlflow.prompt_name if register and self.cfg.mlflow.register else None
        result = registry.log_prompt(prompt, name, registered)
        if registered:
            log.info("Registered %s as %s version %s", name, result.name, result.version)
            return registry.model_uri(result.name, result.version)
        return result.model_uri


def tune(ctx: Context, side: LoadedModel, data: TextClassificationDataModule, name: str) -> SoftPrompt:
    """Tune a prompt on ``side``; the training curve goes to the run as ``{name}/...``."""
    cfg = ctx.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    init = initial_prompt(
        cfg.prompt.init,
        embedding_table(side.model),
        cfg.prompt.length,
        seed=cfg.seed,
        class_token_ids=data.encoder.verbalizer_ids,
        exclude_ids=side.tokenizer.all_special_ids,
    )
    module = PromptTuningModule(
        side.model,
        init,
        optimizer=cfg.prompt.optimizer,
        lr=cfg.prompt.lr,
        weight_decay=cfg.prompt.weight_decay,
        length_normalize=data.encoder.task.length_normalize,
        name=name,
    )
    log.info("Tuning a %d-token prompt on %s for %d steps", cfg.prompt.length, side.name, cfg.trainer.max_steps)
    start = time.perf_counter()
    trainer = ctx.trainer(tuning=True)
    trainer.fit(module, datamodule=data)
    ctx.seconds[f"{name}_tune_seconds"] = time.perf_counter() - start
    prompt = SoftPrompt(
        module.tuned_prompt(),
        base_model=side.name,
        base_model_uri=side.path,
        tokenizer_fingerprint=side.fingerprint,
        task_type="SEQ_2_SEQ_LM" if side.seq2seq else "CAUSAL_LM",
        init=cfg.prompt.init,
        task=data.encoder.task,
    )
    return ctx.tied(prompt, side)


def evaluate(
    ctx: Context, side: LoadedModel, data: TextClassificationDataModule, prompt: torch.Tensor | None, name: str
) -> dict[str, float]:
    """Rank-classification accuracy of ``prompt`` (None: zero-shot) on each evaluation split."""
    module = RankClassificationModule(
        side.model, prompt, length_normalize=data.encoder.task.length_normalize, name=name
    )
    accuracies = {}
    for split in ctx.splits():
        trainer = ctx.trainer()
        if split == "test":
            trainer.test(module, datamodule=data, verbose=False)
        elif split == "validation":
            trainer.validate(module, datamodule=data, verbose=False)
        else:
            raise RecycleError(f"eval_splits may hold 'validation' and 'test', got {split!r}.")
        accuracies[split] = module.results[split]["accuracy"]
        log.info("%s on %s/%s: %.4f", name, side.name, split, accuracies[split])
    return accuracies


def random_prompt_baseline(
    ctx: Context, side: LoadedModel, data: TextClassificationDataModule
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation, per split, over random-token prompts of the prompt's length."""
    table = embedding_table(side.model)
    draws = []
    for draw in range(ctx.cfg.random_prompt_draws):
        generator = torch.Generator().manual_seed(ctx.cfg.seed + 1000 + draw)
        rows = sample_vocab_rows(table, ctx.cfg.prompt.length, generator, exclude_ids=side.tokenizer.all_special_ids)
        draws.append(evaluate(ctx, side, data, rows, f"random_prompt_{draw}"))
    mean = {s: statistics.fmean(d[s] for d in draws) for s in ctx.splits()}
    spread = {s: statistics.pstdev(d[s] for d in draws) for s in ctx.splits()}
    return mean, spread


def fit(ctx: Context, source: LoadedModel, target: LoadedModel, recycler: Recycler) -> Recycler:
    anchors = ctx.cfg.anchors
    start = time.perf_counter()
    fit_recycler(
        recycler,
        source.model,
        source.tokenizer,
        target.model,
        target.tokenizer,
        anchor_offset=anchors.offset,
        anchor_size=anchors.size,
    )
    ctx.seconds["recycle_seconds"] = time.perf_counter() - start
    return recycler


def transform(
    ctx: Context, recycler: Recycler, prompt: SoftPrompt, target: LoadedModel, recycled_from: str | None
) -> SoftPrompt:
    start = time.perf_counter()
    recycled = recycler.transform(prompt, recycled_from).replace(base_model=target.name, base_model_uri=target.path)
    ctx.seconds["recycle_seconds"] = ctx.seconds.get("recycle_seconds", 0.0) + time.perf_counter() - start
    return ctx.tied(recycled, target)


# ---------------------------------------------------------------------- logging
def log_config(cfg: DictConfig) -> None:
    if not is_rank_zero():
        return
    resolved = OmegaConf.to_container(cfg, resolve=True)
    mlflow.log_dict(resolved, "config.yaml")
    params = {k: v for k, v in flatten(resolved).items() if not k.startswith(("paths.", "mlflow."))}
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def log_metrics(metrics: dict[str, float]) -> None:
    if is_rank_zero():
        mlflow.log_metrics(metrics)


# ---------------------------------------------------------------------- jobs
@dataclass
class Setup:
    """Everything loaded and checked before any training."""

    spec: TaskSpec
    source: LoadedModel
    target: LoadedModel
    source_data: TextClassificationDataModule
    target_data: TextClassificationDataModule
    recycler: Recycler
    prompt: SoftPrompt | None


def prepare(cfg: DictConfig) -> Setup:
    if cfg.job not in JOBS:
        raise RecycleError(f"Unknown job {cfg.job!r}; choose one of {', '.join(JOBS)}.")
    recycler = get_recycler(cfg.recycler.name, **cfg.recycler.get("options", {}))
    spec = task_spec(cfg.task)
    source = load_model(cfg.source)
    target = source if cfg.target.path == cfg.source.path else load_model(cfg.target)
    prompt = registry.load_prompt(cfg.prompt_uri) if cfg.prompt_uri else None
    if cfg.job in ("recycle", "evaluate") and prompt is None:
        raise RecycleError(f"job={cfg.job} needs prompt_uri: the prompt to {cfg.job}.")
    if prompt is not None:
        on = target if cfg.job == "evaluate" else source
        prompt.check_fits_model(on.model, on.tokenizer, name=f"{on.name} ({on.path})")
        if prompt.task is not None and prompt.task != spec:
            log.warning("prompt_uri was tuned for task %s; evaluating it on %s", prompt.task, spec)
    source_data, target_data = data_module(source, spec, cfg), data_module(target, spec, cfg)
    if cfg.job in ("main", "tune") and prompt is None:
        source_data.setup("fit")
    for split in (s for s in cfg.eval_splits if cfg.job != "recycle"):
        source_data.dataset(split)
        target_data.dataset(split)
    return Setup(spec, source, target, source_data, target_data, recycler, prompt)


def run(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.job`` and return its metrics (the same on every rank)."""
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    setup = prepare(cfg)
    tags = {"mlflow_recycle.job": cfg.job}
    with job_run(cfg.mlflow.run_name, tags) as run_id:
        ctx = Context(cfg, run_id)
        log_config(cfg)
        metrics = {"main": run_main, "tune": run_tune, "recycle": run_recycle, "evaluate": run_evaluate}[cfg.job](
            ctx, setup
        )
        metrics.update(ctx.seconds)
        log_metrics(metrics)
    return metrics


def run_tune(ctx: Context, s: Setup) -> dict[str, float]:
    ctx.register_bases(s.source)
    prompt = tune(ctx, s.source, s.source_data, "source")
    ctx.publish(prompt, "source_prompt")
    return {
        f"{split}/source_accuracy": acc
        for split, acc in evaluate(ctx, s.source, s.source_data, prompt.embeddings, "source").items()
    }


def run_recycle(ctx: Context, s: Setup) -> dict[str, float]:
    ctx.register_bases(s.target)
    recycled = transform(ctx, fit(ctx, s.source, s.target, s.recycler), s.prompt, s.target, ctx.cfg.prompt_uri)
    ctx.publish(recycled, "recycled_prompt")
    return {}


def target_baselines(ctx: Context, s: Setup) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    zero_shot = evaluate(ctx, s.target, s.target_data, None, "zero_shot")
    random_mean, random_std = random_prompt_baseline(ctx, s.target, s.target_data)
    return zero_shot, random_mean, random_std


def verdict(
    ctx: Context,
    accuracies: dict[str, dict[str, float]],
    errors: dict[str, float],
    title: str,
    subject: str,
    source_name: str | None = None,
) -> dict[str, float]:
    """Per-split metrics, the success flag and the chart for the prompt under test (``subject``).

    ``accuracies[label][split]``; every label but ``source`` is measured on the target.
    """
    metrics: dict[str, float] = {}
    for split in ctx.splits():
        for label, per_split in accuracies.items():
            metrics[f"{split}/{label}_accuracy"] = per_split[split]
        best = max(accuracies["zero_shot"][split], accuracies["random_prompt"][split])
        metrics[f"{split}/best_baseline_accuracy"] = best
        metrics[f"{split}/success"] = float(accuracies[subject][split] > best)
        if "retuned" in accuracies and accuracies["retuned"][split] > best:
            gap = accuracies["retuned"][split] - best
            metrics[f"{split}/recovery"] = (accuracies[subject][split] - best) / gap
    final = ctx.splits()[-1]
    metrics["success"] = metrics[f"{final}/success"]
    if is_rank_zero():
        mlflow.set_tag("mlflow_recycle.verdict", "success" if metrics["success"] else "failure")
        names = {label: label.replace("_", " ") for label in accuracies}
        names["source"] = f"source prompt\non {source_name}"
        chart = accuracy_chart(
            {names[label]: per_split[final] for label, per_split in accuracies.items()},
            errors={"random prompt": errors.get(final, 0.0)},
            baseline=metrics[f"{final}/best_baseline_accuracy"],
            title=title,
        )
        mlflow.log_figure(chart, "recycling_results.png")
    log.info("Verdict (%s): %s", final, "success" if metrics["success"] else "failure")
    return metrics


def run_evaluate(ctx: Context, s: Setup) -> dict[str, float]:
    prompt = evaluate(ctx, s.target, s.target_data, s.prompt.embeddings, "prompt")
    zero_shot, random_mean, random_std = target_baselines(ctx, s)
    accuracies = {"prompt": prompt, "zero_shot": zero_shot, "random_prompt": random_mean}
    return verdict(ctx, accuracies, random_std, f"{s.spec.name} on {s.target.name}", "prompt")


def run_main(ctx: Context, s: Setup) -> dict[str, float]:
    cfg = ctx.cfg
    ctx.register_bases(s.source, s.target)
    recycler = fit(ctx, s.source, s.target, s.recycler)  # before tuning: a bad pair fails fast
    if s.prompt is not None and str(cfg.prompt_uri).startswith("models:/"):
        source_prompt, source_uri = s.prompt, str(cfg.prompt_uri)  # already registered
    else:
        source_prompt = s.prompt or tune(ctx, s.source, s.source_data, "source")
        source_uri = ctx.publish(source_prompt, "source_prompt")
    accuracies = {"source": evaluate(ctx, s.source, s.source_data, source_prompt.embeddings, "source")}
    recycled = transform(ctx, recycler, source_prompt, s.target, source_uri)
    ctx.publish(recycled, "recycled_prompt")
    accuracies["recycled"] = evaluate(ctx, s.target, s.target_data, recycled.embeddings, "recycled")
    zero_shot, random_mean, random_std = target_baselines(ctx, s)
    accuracies.update(zero_shot=zero_shot, random_prompt=random_mean)
    if cfg.retune:
        retuned = tune(ctx, s.target, s.target_data, "target")
        accuracies["retuned"] = evaluate(ctx, s.target, s.target_data, retuned.embeddings, "retuned")
        ctx.publish(retuned, "retuned_prompt", register=False)
    title = f"{s.spec.name}: {s.source.name} → {s.target.name} ({recycler.name})"
    metrics = verdict(ctx, accuracies, random_std, title, "recycled", source_name=s.source.name)
    for split in ctx.splits():
        metrics[f"{split}/random_prompt_std"] = random_std[split]
    return metrics
