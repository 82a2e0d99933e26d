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
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import mlflow
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from lightning_modules import TextClassificationDataModule, TrainerFactory

from . import registry
from .charts import accuracy_chart, confusion_chart
from .config import model_recipe, with_recipe
from .errors import RecycleError
from .evaluation import Baselines, Evaluator, verdict_metrics
from .models import LoadedModel, configure_threads, load_model, model_dir
from .policy import Policy, PolicyOutcome, Transfer, build_policy, build_transfer, cost_metrics, run_policy
from .prompt import SoftPrompt
from .recyclers import get_recycler
from .task import TaskSpec
from .tracking import configure, flatten, is_rank_zero, job_run, lightning_logger
from .tuning import data_module, task_spec, tune_prompt

log = logging.getLogger(__name__)

JOBS = ("main", "tune", "recycle", "evaluate")
#: The job's verdict on its report split, on the run and on the recycled prompt's version.
TAG_VERDICT = "mlflow_recycle.verdict"


# ---------------------------------------------------------------------- setup
@dataclass
class Setup:
    """Everything loaded and checked before any training."""

    spec: TaskSpec
    source: LoadedModel
    target: LoadedModel
    source_data: TextClassificationDataModule
    target_data: TextClassificationDataModule
    policy: Policy
    prompt: SoftPrompt | None
    prompt_uri: str | None = None  # cfg.prompt_uri with a registry alias resolved to its version


def prepare(cfg: DictConfig) -> Setup:
    if cfg.job not in JOBS:
        raise RecycleError(f"Unknown job {cfg.job!r}; choose one of {', '.join(JOBS)}.")
    policy = build_policy(cfg, cfg.target)
    for choice in policy.recycle.recyclers:  # a misspelt recycler or option fails before any loading
        get_recycler(choice.name, **choice.options)
    spec = task_spec(cfg.task)
    if cfg.job in ("recycle", "evaluate") and not cfg.prompt_uri:
        raise RecycleError(f"job={cfg.job} needs prompt_uri: the prompt to {cfg.job}.")
    prompt = registry.load_prompt(cfg.prompt_uri) if cfg.prompt_uri else None  # before the models: a typo costs nothing
    # lineage names a version, never an alias (aliases move): models:/p@source -> models:/p/3
    prompt_uri = registry.pinned(str(cfg.prompt_uri)) if cfg.prompt_uri else None
    configure_threads(cfg.get("threads"))
    source = load_model(cfg.source, cache=cfg.paths.get("cache"))
    same = (model_dir(cfg.target), cfg.target.get("gguf_file")) == (model_dir(cfg.source), cfg.source.get("gguf_file"))
    target = source if same else load_model(cfg.target, cache=cfg.paths.get("cache"))
    if prompt is not None:
        on = target if cfg.job == "evaluate" else source
        prompt.check_fits_model(on.model, on.tokenizer, name=f"{on.name} ({on.uri})")
        if prompt.task is not None and prompt.task.replace(data=spec.data) != spec:
            log.warning("prompt_uri was tuned for task %s; evaluating it on %s", prompt.task, spec)
    # each side's batches as its model's recipe sets them (task.batch_size), the task the same
    source_data = data_module(source, spec, with_recipe(cfg, cfg.source))
    target_data = data_module(target, spec, with_recipe(cfg, cfg.target))
    if cfg.job in ("main", "tune") and prompt is None:
        source_data.setup("fit")
    if cfg.job != "recycle":
        for split in {*cfg.eval.splits, policy.gate.split}:
            source_data.dataset(split)
            target_data.dataset(split)
    return Setup(spec, source, target, source_data, target_data, policy, prompt, prompt_uri)


# ---------------------------------------------------------------------- steps
@dataclass
class Context:
    """What the steps share: config, evaluator, run id (rank 0 only), timings, base versions."""

    cfg: DictConfig
    run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: Validation accuracy of each tuning's kept prompt, by tuning name (when it validated).
    best_validation: dict[str, float] = field(default_factory=dict)
    #: Registered base-model versions by model name (rank 0, when registry.register is on).
    bases: dict[str, ModelVersion] = field(default_factory=dict)
    #: URIs of the prompts the job logged or registered, by name.
    published: dict[str, str] = field(default_factory=dict)
    #: Prompts to register when the job ends well: ``(name, prompt, logged URI, tags)``.
    to_register: list[tuple[str, SoftPrompt, str, dict[str, str]]] = field(default_factory=list)
    #: What the policy did to the job's prompt (main and recycle jobs), and its metrics.
    outcome: PolicyOutcome | None = None
    outcome_metrics: dict[str, float] = field(default_factory=dict)

    @cached_property
    def logger(self) -> Any:
        """Lightning's logger for the training curves (``conf/logger``; built once, in the job's run).
        False (no logger) outside a job's run, e.g. a benchmark tuning through :func:`tune`."""
        return lightning_logger(self.cfg.get("logger")) if self.run_id is not None else False

    @property
    def trainer(self) -> TrainerFactory:
        return instantiate(self.cfg.trainer, _partial_=True)

    @property
    def evaluator(self) -> Evaluator:
        cfg = self.cfg
        return Evaluator(self.trainer, tuple(cfg.eval.splits), cfg.eval.random_prompt_draws, cfg.seed)

    @property
    def splits(self) -> list[str]:
        return [str(s) for s in self.cfg.eval.splits]

    def register_bases(self, *sides: LoadedModel) -> None:
        """Find or register each side's base-model version, so prompts can be tied to it, with its model
        config's tuning recipe (a migration into that version re-tunes with it)."""
        if is_rank_zero() and self.cfg.registry.register:
            recipes = {model.name: model_recipe(model) for model in (self.cfg.source, self.cfg.target)}
            for side in sides:
                self.bases[side.name] = registry.register_base_model(
                    side.uri, side.registered_name, bos=side.bos, recipe=recipes.get(side.name),
                    copy_weights=self.cfg.registry.get("copy_weights"),
                )  # fmt: skip

    def tied(self, prompt: SoftPrompt, side: LoadedModel) -> SoftPrompt:
        base = self.bases.get(side.name)
        return registry.tie(prompt, base) if base else prompt

    def publish(
        self,
        prompt: SoftPrompt,
        name: str,
        side: LoadedModel,
        register: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Log ``prompt`` of model ``side`` as model ``name`` of the run (rank 0), with ``side``'s tokenizer for
        PEFT, and, when asked and ``registry.register`` is on, keep it for :meth:`register_published`. Returns
        its logged URI."""
        if not is_rank_zero():
            return None
        uri = registry.log_prompt(prompt, name, tags=tags, tokenizer=side.tokenizer).model_uri
        self.published[name] = uri
        if register and self.cfg.registry.register:
            self.to_register.append((name, prompt, uri, dict(tags or {})))
        return uri

    def register_published(self) -> None:
        """Register what the job published, when it has ended well: an interrupted or failed job
        registers nothing. Each prompt is registered once (a version holding the same prompt is
        reused: the source prompt of every job of a multirun is one version), and a recycled
        prompt's lineage names its source's registered version, as a migration's does."""
        registered: dict[str, str] = {}
        for name, prompt, logged, tags in self.to_register:
            lineage = registered.get(prompt.recycled_from or "")
            if lineage:
                tags = {**tags, registry.TAG_RECYCLED_FROM: lineage}
            version = registry.register_prompt(logged, self.cfg.registry.prompt_name, prompt, tags=tags, once=True)
            if name == "recycled_prompt" and self.outcome is not None:
                source = lineage or prompt.recycled_from  # the registered source, or the prompt_uri it came from
                about = self.outcome.description(source, self.outcome_metrics.get("policy/compute_fraction"))
                MlflowClient().update_model_version(version.name, version.version, description=about)
            alias = (self.cfg.registry.get("aliases") or {}).get(name)
            if alias:
                MlflowClient().set_registered_model_alias(version.name, alias, version.version)
            log.info(
                "Registered %s as %s version %s%s", name, version.name, version.version,
                f" (alias @{alias})" if alias else "",
            )  # fmt: skip
            registered[logged] = self.published[name] = registry.model_uri(version.name, version.version)
        self.to_register.clear()


def tune(
    ctx: Context, side: LoadedModel, data: TextClassificationDataModule, name: str, model: DictConfig | None = None
) -> SoftPrompt:
    """Tune a prompt on ``side`` with the recipe of its model config ``model``, tied to its base version;
    the training curve goes to the run as ``{name}/...``, the cost to the job's metrics."""
    prompt, outcome = tune_prompt(with_recipe(ctx.cfg, model), side, data, name, logger=ctx.logger)
    ctx.seconds[f"{name}_tune_seconds"] = outcome.seconds
    ctx.seconds[f"{name}_tune_flops"] = outcome.compute.flops
    if outcome.best_step is not None:
        ctx.best_validation[name] = outcome.score
    return ctx.tied(prompt, side)


def migrate_prompt(
    ctx: Context, pair: Transfer, policy: Policy, prompt: SoftPrompt, recycled_from: str | None
) -> tuple[PolicyOutcome, dict[str, float]]:
    """Run the policy on one prompt, tie the result to the target's registered version, and record the
    stages, the gate and the cost against tuning ``prompt`` from scratch (the run's tags, and the metrics
    returned)."""
    outcome = ctx.outcome = run_policy(policy, pair, prompt, recycled_from)
    ctx.seconds["recycle_seconds"] = outcome.seconds
    ctx.seconds.update(pair.costs)  # the maps' fits: seconds, anchors
    outcome.prompt = ctx.tied(outcome.prompt, pair.target)
    ctx.outcome_metrics = {**outcome.metrics(), **cost_metrics(outcome, prompt, pair.target)}
    if is_rank_zero():
        mlflow.set_tags(registry.outcome_tags(outcome))
    return outcome, dict(ctx.outcome_metrics)


# ---------------------------------------------------------------------- logging
def log_config(cfg: DictConfig) -> None:
    if not is_rank_zero():
        return
    # as the source prompt is tuned: its model's recipe applied, so `prompt.optimizer.lr` says what ran
    resolved = OmegaConf.to_container(with_recipe(cfg, cfg.get("source")), resolve=True)
    # the experiment the run is in: `mlflow run` chooses it (--experiment-name), not mlflow.experiment
    run = mlflow.active_run()
    experiment = mlflow.get_experiment(run.info.experiment_id).name if run else resolved["mlflow"]["experiment"]
    if experiment != resolved["mlflow"]["experiment"]:
        log.warning(
            "This run is in experiment %r, chosen by whoever started it (mlflow run: --experiment-name), "
            "not mlflow.experiment=%r; `mlflow run . --experiment-name %s` keeps every run together.",
            experiment, resolved["mlflow"]["experiment"], resolved["mlflow"]["experiment"],
        )  # fmt: skip
        resolved["mlflow"]["experiment"] = experiment
    mlflow.log_dict(resolved, "config.yaml")
    params = {k: v for k, v in flatten(resolved).items() if not k.startswith(("paths.", "mlflow."))}
    # what recycles, in full (`recycler.name` alone reads `linear` for linear+distill)
    params["recycler.method"] = " / ".join(c.label for c in build_policy(cfg, cfg.target).recycle.recyclers)
    # Under Hydra, its config-group picks too (choices.prompt/scheduler: one_cycle), as a sweep sets them.
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        params.update({f"choices.{k.replace('@', ':')}": v for k, v in choices.items() if not k.startswith("hydra/")})
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def verdict(
    ctx: Context,
    accuracies: dict[str, dict[str, float]],
    baselines: Baselines,
    subject: str,
    title: str,
    data: TextClassificationDataModule,
    source_name: str | None = None,
) -> dict[str, float]:
    """Per-split metrics, the success flag (on the last split: the report, of ``data``'s examples)
    and the chart.

    ``accuracies[label][split]`` are measured on the target, except ``source``.
    """
    metrics = verdict_metrics(accuracies, baselines, subject, ctx.splits)
    final = ctx.splits[-1]
    metrics["success"] = metrics[f"{final}/success"]
    if is_rank_zero():
        mlflow.set_tag(TAG_VERDICT, "success" if metrics["success"] else "failure")
        shown = {**accuracies, "zero_shot": baselines.zero_shot, "random_prompt": baselines.random_prompt}
        names = {label: label.replace("_", " ") for label in shown}
        names["source"] = f"source prompt\non {source_name}"
        draws = ctx.cfg.eval.random_prompt_draws
        chart = accuracy_chart(
            {names[label]: per_split[final] for label, per_split in shown.items()},
            errors={"random prompt": baselines.random_prompt_std[final]},
            error_meaning=f"random prompt: mean and standard deviation over {draws} draws" if draws > 1 else "",
            baseline=baselines.best(final),
            title=f"{title}: {'success' if metrics['success'] else 'failure'}",
            subtitle=f"{final} split, {len(data.dataset(final))} examples; success = {subject} > best baseline",
            subjects=(subject,),
        )
        mlflow.log_figure(chart, "recycling_results.png")
    log.info("Verdict (%s): %s", final, "success" if metrics["success"] else "failure")
    return metrics


# ---------------------------------------------------------------------- jobs
def run(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.job`` and return its metrics (the same on every rank)."""
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    setup = prepare(cfg)
    with job_run(cfg.mlflow.run_name or run_name(cfg, setup), {"mlflow_recycle.job": cfg.job}) as run_id:
        ctx = Context(cfg, run_id)
        log_config(cfg)
        job = {"main": run_main, "tune": run_tune, "recycle": run_recycle, "evaluate": run_evaluate}[cfg.job]
        metrics = job(ctx, setup)
        metrics.update(ctx.seconds)
        if is_rank_zero():
            mlflow.log_metrics(metrics)
            ctx.register_published()
            text = summary(ctx, setup, metrics)
            mlflow.set_tag(MLFLOW_RUN_NOTE, f"```\n{text}\n```")  # the run's Description, read first in the UI
            log.info("%s", text)
    return metrics


def run_name(cfg: DictConfig, s: Setup) -> str:
    """What ran, and a short unique suffix: the jobs of a multirun (which reseed the global RNG
    MLflow draws its random names from) get distinct names."""
    what = {
        "main": f"{s.source.name}→{s.target.name} {s.policy.label}",
        "tune": f"tune {s.source.name}",
        "recycle": f"recycle →{s.target.name} {s.policy.label}",
        "evaluate": f"evaluate on {s.target.name}",
    }[cfg.job]
    return f"{what} {uuid.uuid4().hex[:6]}"


#: The summary's rows: metric label -> what the row holds.
ROWS = {
    "source": "source prompt, on {source}",
    "recycled": "migrated prompt, on {target}",
    "prompt": "prompt, on {target}",
    "retuned": "re-tuned from scratch, on {target}",
    "zero_shot": "{target} zero-shot",
    "random_prompt": "{target} random prompt",
    "best_baseline": "{target} best baseline",
}


def summary(ctx: Context, s: Setup, metrics: dict[str, float]) -> str:
    """The job's closing lines: what ran, accuracies per split, the gate and the verdict, the cost, where things are."""
    cfg = ctx.cfg
    lines = [f"{cfg.job} job on {s.spec.name}: {s.source.name} → {s.target.name}, policy {s.policy.label}"]
    if "source_tune_steps" in ctx.seconds or "source_tune_seconds" in metrics:
        lines.append(f"  tuned a {cfg.prompt.length}-token prompt on {s.source.name}: {cfg.trainer.max_steps} steps, "
                     f"{metrics['source_tune_seconds']:.0f} s")  # fmt: skip
    splits = [split for split in ("validation", "test") if any(k.startswith(f"{split}/") for k in metrics)]
    if splits:
        lines.append(f"  {'':<36}" + "".join(f"{split:>12}" for split in splits))
        for label, row in ROWS.items():
            cells = [metrics.get(f"{split}/{label}_accuracy") for split in splits]
            if any(c is not None for c in cells):
                name = row.format(source=s.source.name, target=s.target.name)
                lines.append(f"  {name:<36}" + "".join(f"{c:>12.4f}" if c is not None else f"{'':>12}" for c in cells))
    lines += _outcome_lines(ctx.outcome, metrics, cfg)
    lines += [f"  {name}: {uri}" for name, uri in ctx.published.items()]
    run = mlflow.active_run()
    if run is not None:
        lines.append(f"  run {run.info.run_id} (experiment {run.info.experiment_id}) in {mlflow.get_tracking_uri()}")
    return "\n".join(lines)


def _outcome_lines(outcome: PolicyOutcome | None, metrics: dict[str, float], cfg: DictConfig) -> list[str]:
    """The gate (the stage that passed, or why none did), the share of the source's gain kept, the verdict, the cost."""
    lines = []
    if outcome is not None:
        tried = ", ".join(f"{method} {score:.4f}" for method, score in outcome.records[0].tried.items())
        lines.append(f"  the maps alone on validation: {tried or 'not judged'}")
        where = f"at {outcome.stage}" if outcome.stage else ""
        lines.append(f"  gate {outcome.gate} {where}".rstrip() + (f": {outcome.reason}" if outcome.reason else ""))
        if outcome.gain_kept is not None:
            lines.append(f"  kept {outcome.gain_kept:.0%} of the source prompt's gain on validation")
    if "success" in metrics:
        verdict = "success" if metrics["success"] else "failure"
        final = list(cfg.eval.splits)[-1]
        lines.append(f"  verdict on {final}: {verdict} (migrated prompt vs the best baseline, reported, not deciding)")
    if "policy/steps" in metrics:
        steps, seconds, flops = int(metrics["policy/steps"]), metrics["policy/seconds"], metrics["policy/flops"]
        share = metrics.get("policy/compute_fraction")
        of = f" = {share:.1%} of tuning from scratch" if share is not None else ""
        lines.append(f"  migration cost: {steps} steps, {seconds:.1f} s, {flops:.3g} FLOPs{of}")
    return lines


def run_tune(ctx: Context, s: Setup) -> dict[str, float]:
    ctx.register_bases(s.source)
    prompt = tune(ctx, s.source, s.source_data, "source", ctx.cfg.source)
    ctx.publish(prompt, "source_prompt", s.source)
    return {f"{split}/source_accuracy": value for split, value in source_accuracy(ctx, s, prompt).items()}


def run_recycle(ctx: Context, s: Setup) -> dict[str, float]:
    ctx.register_bases(s.target)
    pair = build_transfer(ctx.cfg, s.source, s.target)
    outcome, metrics = migrate_prompt(ctx, pair, s.policy, s.prompt, s.prompt_uri)
    ctx.publish(outcome.prompt, "recycled_prompt", s.target, tags=registry.outcome_tags(outcome, metrics))
    return metrics


def class_report(ctx: Context, s: Setup, prompt: SoftPrompt, name: str, metrics: dict[str, float]) -> dict[str, float]:
    """Accuracy of ``prompt`` on the target per split; class by class into ``metrics`` (recall and
    share of predictions per class, macro-F1) and, on rank 0, the report split's confusion matrix
    as ``confusion_<name>.png``. Returns the accuracies."""
    reports = ctx.evaluator.report(s.target, s.target_data, prompt.embeddings, name)
    for split, report in reports.items():
        metrics.update(report.metrics(f"{split}/{name}"))
    final = reports[ctx.splits[-1]]
    if is_rank_zero() and final.confusion:
        title = f"{name} prompt on {s.target.name}, {ctx.splits[-1]} ({sum(map(sum, final.confusion))} examples)"
        mlflow.log_figure(confusion_chart(final.confusion, final.classes, title=title), f"confusion_{name}.png")
    return {split: report.accuracy for split, report in reports.items()}


def run_evaluate(ctx: Context, s: Setup) -> dict[str, float]:
    metrics: dict[str, float] = {}
    accuracies = {"prompt": class_report(ctx, s, s.prompt, "prompt", metrics)}
    baselines = ctx.evaluator.baselines(s.target, s.target_data, s.prompt.length)
    title = f"{s.spec.name} on {s.target.name}"
    return {**metrics, **verdict(ctx, accuracies, baselines, "prompt", title, s.target_data)}


def source_accuracy(ctx: Context, s: Setup, prompt: SoftPrompt) -> dict[str, float]:
    """The source prompt's accuracy on its own model per split; validation's as its tuning measured it
    (the kept prompt's, on the same examples), when this job tuned it."""
    known = {"validation": ctx.best_validation["source"]} if "source" in ctx.best_validation else {}
    if s.policy.gate.metric != "accuracy":
        known = {}  # the tuning kept the prompt by another metric
    rest = tuple(split for split in ctx.splits if split not in known)
    evaluator = Evaluator(ctx.trainer, rest, ctx.cfg.eval.random_prompt_draws, ctx.cfg.seed) if rest else None
    return {**known, **(evaluator.accuracy(s.source, s.source_data, prompt.embeddings, "source") if evaluator else {})}


def run_main(ctx: Context, s: Setup) -> dict[str, float]:
    cfg, evaluator = ctx.cfg, ctx.evaluator
    ctx.register_bases(s.source, s.target)
    pair = build_transfer(cfg, s.source, s.target)
    for choice in s.policy.recycle.recyclers:  # before tuning: a pair a recycler cannot map fails fast
        if choice.when is None:
            pair.recycler(choice)
    if s.prompt is not None and str(s.prompt_uri).startswith("models:/"):
        source_prompt, source_uri = s.prompt, s.prompt_uri  # already registered
    else:
        source_prompt = s.prompt or tune(ctx, s.source, s.source_data, "source", cfg.source)
        source_uri = ctx.publish(source_prompt, "source_prompt", s.source)
    accuracies = {"source": source_accuracy(ctx, s, source_prompt)}
    if "source" in ctx.best_validation:  # the gate's share of the source's gain: its tuning's score, not a new one
        metric = s.policy.gate.metric
        pair.known(s.source, source_prompt, "validation", s.source_data, metric, ctx.best_validation["source"])
    outcome, metrics = migrate_prompt(ctx, pair, s.policy, source_prompt, source_uri)
    accuracies["recycled"] = class_report(ctx, s, outcome.prompt, "recycled", metrics)
    # per split, shared with the policy's gate: the gate split's baselines are measured once
    baselines = Baselines.merge([pair.baselines(s.target, source_prompt, split, s.target_data) for split in ctx.splits])
    if cfg.retune:
        retuned = tune(ctx, s.target, s.target_data, "target", cfg.target)
        accuracies["retuned"] = evaluator.accuracy(s.target, s.target_data, retuned.embeddings, "retuned")
        ctx.publish(retuned, "retuned_prompt", s.target, register=False)
    title = f"{s.spec.name}: {s.source.name} → {s.target.name} ({s.policy.label})"
    metrics.update(verdict(ctx, accuracies, baselines, "recycled", title, s.target_data, source_name=s.source.name))
    # the version carries its gate (decided on validation) and the job's verdict, as a migration tags it
    tags = {**registry.outcome_tags(outcome, metrics), TAG_VERDICT: "success" if metrics["success"] else "failure"}
    ctx.publish(outcome.prompt, "recycled_prompt", s.target, tags=tags)
    return metrics
