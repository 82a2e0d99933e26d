"""Automatic migration: recycle every prompt tied to one base-model version onto a newer one.

``migrate("imdb-lm", to_version=2)`` finds every soft-prompt version tied to the newest
earlier version of ``imdb-lm`` that has prompts, fits the recycler once (or reuses the
fitted one logged by an earlier migration between the same versions), recycles each
prompt, evaluates it on the new base model where the prompt names its evaluation data,
and registers it as a new version of the same prompt model, tied to version 2. The
configured alias moves only to a version that passes the gate; a failing one is still
registered and tagged ``failed``, so nothing is silently dropped.

Idempotent: each recycled version is created with a migration key (prompt version, base
versions, recycler config) in its tags, so running the same migration again, after a
crash or from a duplicate event, creates no second version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig, OmegaConf

from . import registry
from .config import compose
from .errors import RecycleError
from .evaluation import Baselines, Evaluator, task_data
from .models import LoadedModel, load_base_model
from .prompt import SoftPrompt
from .recycle import fit_recycler
from .recyclers import Recycler, get_recycler, load_recycler
from .refine import distill, refine_settings
from .tracking import configure

log = logging.getLogger(__name__)

TAG_MIGRATION_KEY = "mlflow_recycle.migration_key"
TAG_GATE = "mlflow_recycle.gate"
TAG_RECYCLER_KEY = "mlflow_recycle.recycler_key"
METRIC_TAG_PREFIX = "mlflow_recycle.metric."
GATE_PASSED, GATE_FAILED, GATE_UNEVALUATED = "passed", "failed", "unevaluated"


class MigrationError(RecycleError):
    """Some prompts could not be migrated; the others were."""


@dataclass
class MigratedPrompt:
    """The outcome for one source prompt version."""

    source: str
    target: str
    created: bool
    gate: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class MigrationReport:
    base_model: str
    to_version: str
    from_version: str | None
    recycler: str
    prompts: list[MigratedPrompt] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def created(self) -> int:
        return sum(p.created for p in self.prompts)


def _digest(payload: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def recycler_settings(cfg: DictConfig) -> dict[str, Any]:
    """What determines the fitted map: recycler, its options and the anchor vocabulary."""
    return {
        "recycler": cfg.recycler.name,
        "options": OmegaConf.to_container(cfg.recycler.get("options", {}), resolve=True),
        "anchors": OmegaConf.to_container(cfg.anchors, resolve=True),
        "refine": OmegaConf.to_container(cfg.recycler.refine, resolve=True) if cfg.recycler.get("refine") else None,
    }


def migration_key(source: ModelVersion, base_model: str, from_version: str, to_version: str, cfg: DictConfig) -> str:
    """Identity of one prompt's migration: same key, same result, so never registered twice."""
    payload = {"prompt": source.name, "version": str(source.version), "base": base_model}
    payload.update({"from": from_version, "to": to_version, **recycler_settings(cfg)})
    return _digest(payload)


def previous_version_with_prompts(base_model: str, to_version: str) -> str | None:
    """The newest version of ``base_model`` before ``to_version`` that has prompts tied to it."""
    earlier = [v for v in registry.base_versions(base_model) if int(v.version) < int(to_version)]
    for version in sorted(earlier, key=lambda v: int(v.version), reverse=True):
        if registry.prompts_for(base_model, version.version):
            return str(version.version)
    return None


def _existing(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{name}' AND tags.`{TAG_MIGRATION_KEY}` = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _move_alias(client: MlflowClient, version: ModelVersion, alias: str | None) -> None:
    """Point ``alias`` at ``version`` if it passed and the alias is not already on a newer version."""
    if not alias or version.tags.get(TAG_GATE) != GATE_PASSED:
        return
    try:
        current = int(client.get_model_version_by_alias(version.name, alias).version)
    except mlflow.exceptions.MlflowException:
        current = 0
    if current < int(version.version):
        client.set_registered_model_alias(version.name, alias, version.version)
        log.info("Alias %s@%s -> version %s", version.name, alias, version.version)


class _Migration:
    """One (base, from, to, recycler) migration: loads models and fits the map once."""

    def __init__(self, cfg: DictConfig, base_model: str, from_version: str, to_version: str) -> None:
        self.cfg, self.base_model, self.from_version, self.to_version = cfg, base_model, from_version, to_version
        self.client = MlflowClient()
        self.evaluator = Evaluator(cfg.trainer, tuple(cfg.eval.splits), cfg.eval.random_prompt_draws, cfg.seed)
        self._baselines: dict[tuple[Any, int], Baselines] = {}
        self.source = self._side(from_version)
        self.target = self._side(to_version)

    def _side(self, version: str) -> LoadedModel:
        uri = registry.model_uri(self.base_model, version)
        model, tokenizer = load_base_model(uri)
        return LoadedModel(f"{self.base_model} v{version}", uri, model, tokenizer, self.base_model)

    def fitted_recycler(self) -> Recycler:
        """The map for this pair: reused from an earlier migration's run when one logged it."""
        key = _digest(
            {"base": self.base_model, "from": self.from_version, "to": self.to_version, **recycler_settings(self.cfg)}
        )
        earlier = mlflow.search_runs(
            search_all_experiments=True, filter_string=f"tags.`{TAG_RECYCLER_KEY}` = '{key}'", output_format="list"
        )
        if earlier:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(
                    run_id=earlier[0].info.run_id, artifact_path="recycler", dst_path=tmp
                )
                log.info("Reusing the fitted recycler of run %s", earlier[0].info.run_id)
                return load_recycler(path)
        anchors = self.cfg.anchors
        recycler = fit_recycler(
            get_recycler(self.cfg.recycler.name, **self.cfg.recycler.get("options", {})),
            self.source.model,
            self.source.tokenizer,
            self.target.model,
            self.target.tokenizer,
            anchor_offset=anchors.offset,
            anchor_size=anchors.size,
        )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(recycler.save(tmp)), "recycler")
        mlflow.set_tag(TAG_RECYCLER_KEY, key)  # after the artifact: a tagged run always has it
        return recycler

    def evaluate(self, prompt: SoftPrompt) -> tuple[str, dict[str, float]]:
        """Gate verdict and metrics of a recycled prompt on the target model."""
        task = prompt.task
        if not self.cfg.evaluate or task is None or not task.data or not Path(task.data).exists():
            reason = (
                "evaluation is off"
                if not self.cfg.evaluate
                else f"its task data {task.data if task else None!r} is not available"
            )
            log.warning("Not evaluating %s: %s", prompt.recycled_from, reason)
            return GATE_UNEVALUATED, {}
        data = task_data(
            self.target,
            task,
            prompt_length=prompt.length,
            eval_batch_size=self.cfg.eval.eval_batch_size,
            limit_test=self.cfg.eval.limit_test,
            seed=self.cfg.seed,
        )
        baseline_key = (task, prompt.length)
        if baseline_key not in self._baselines:  # once per task and length, not per prompt
            self._baselines[baseline_key] = self.evaluator.baselines(self.target, data, prompt.length)
        baselines = self._baselines[baseline_key]
        recycled = self.evaluator.accuracy(self.target, data, prompt.embeddings, "recycled")
        metrics = {}
        for split in self.evaluator.splits:
            metrics.update(
                {
                    f"{split}/recycled_accuracy": recycled[split],
                    f"{split}/zero_shot_accuracy": baselines.zero_shot[split],
                    f"{split}/random_prompt_accuracy": baselines.random_prompt[split],
                    f"{split}/best_baseline_accuracy": baselines.best(split),
                }
            )
        final = self.evaluator.splits[-1]
        return (GATE_PASSED if baselines.beaten_by(recycled[final], final) else GATE_FAILED), metrics

    def migrate_one(self, source: ModelVersion, key: str, recycler: Recycler) -> MigratedPrompt:
        source_uri = registry.model_uri(source.name, source.version)
        prompt = registry.load_prompt(source_uri)
        target_base = self.client.get_model_version(self.base_model, self.to_version)
        recycled = recycler.transform(prompt, source_uri)
        settings = refine_settings(self.cfg.recycler)
        if settings is not None:
            recycled = distill(
                self.source, prompt, self.target, recycled, settings, self.cfg.trainer, seed=self.cfg.seed
            )
        recycled = registry.tie(recycled, target_base)
        with mlflow.start_run(
            run_name=f"{source.name} v{source.version} -> {self.base_model} v{self.to_version}", nested=True
        ):
            gate, metrics = self.evaluate(recycled)
            mlflow.log_metrics(metrics)
            mlflow.set_tags({TAG_GATE: gate, TAG_MIGRATION_KEY: key})
            tags = {TAG_MIGRATION_KEY: key, TAG_GATE: gate}
            tags.update({f"{METRIC_TAG_PREFIX}{name}": f"{value:.4f}" for name, value in metrics.items()})
            version = registry.log_prompt(recycled, "recycled_prompt", source.name, tags=tags)
        log.info("%s -> %s version %s (%s)", source_uri, version.name, version.version, gate)
        _move_alias(self.client, version, self.cfg.alias)
        return MigratedPrompt(source_uri, registry.model_uri(version.name, version.version), True, gate, metrics)


def migrate(
    base_model: str,
    to_version: str | int,
    from_version: str | int | None = None,
    *,
    cfg: DictConfig | None = None,
    overrides: Sequence[str] = (),
) -> MigrationReport:
    """Recycle every prompt of ``from_version`` (default: the newest earlier version with prompts) to ``to_version``.

    ``cfg`` is the ``conf/migrate.yaml`` config (composed with ``overrides`` when not given).
    Raises :class:`MigrationError` after migrating all others if some prompts failed.
    """
    cfg = cfg if cfg is not None else compose(overrides, config_name="migrate")
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    start, to_version = time.perf_counter(), str(to_version)
    from_version = (
        str(from_version) if from_version is not None else previous_version_with_prompts(base_model, to_version)
    )
    report = MigrationReport(base_model, to_version, from_version, cfg.recycler.name)
    if from_version is None:
        log.info("No version of %s before %s has prompts: nothing to migrate", base_model, to_version)
        return report
    client = MlflowClient()
    keyed = [
        (s, migration_key(s, base_model, from_version, to_version, cfg))
        for s in registry.prompts_for(base_model, from_version)
    ]
    todo = []
    for source, key in keyed:
        existing = _existing(client, source.name, key)
        if existing is None:
            todo.append((source, key))
            continue
        _move_alias(client, existing, cfg.alias)  # finish what a crashed attempt may have left
        source_uri, target_uri = (
            registry.model_uri(source.name, source.version),
            registry.model_uri(existing.name, existing.version),
        )
        report.prompts.append(MigratedPrompt(source_uri, target_uri, False, existing.tags.get(TAG_GATE, "")))
    log.info("%s v%s -> v%s: %d prompts, %d to migrate", base_model, from_version, to_version, len(keyed), len(todo))
    if todo:
        failures = []
        tags = {"mlflow_recycle.job": "migrate", "mlflow_recycle.base_model": base_model}
        with mlflow.start_run(run_name=f"migrate {base_model} v{from_version} -> v{to_version}", tags=tags):
            # "migrated_from": the resolved version (an MLproject run already logged the requested one)
            params = {"base_model": base_model, "to_version": to_version, "migrated_from": from_version}
            mlflow.log_params({**params, "recycler": cfg.recycler.name})
            migration = _Migration(cfg, base_model, from_version, to_version)
            recycler = migration.fitted_recycler()
            for source, key in todo:
                try:
                    report.prompts.append(migration.migrate_one(source, key, recycler))
                except RecycleError as exc:
                    log.error("Cannot migrate %s v%s: %s", source.name, source.version, exc)
                    failures.append(f"{source.name} v{source.version}: {exc}")
            mlflow.log_metric("migrated_prompts", sum(p.created for p in report.prompts))
        if failures:
            raise MigrationError(f"{len(failures)} of {len(todo)} prompts were not migrated: " + "; ".join(failures))
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------- reconcile
def bases_with_prompts() -> list[str]:
    """Names of the base models that have soft prompts tied to some version."""
    found = MlflowClient().search_model_versions(f"tags.`{registry.TAG_KIND}` = '{registry.KIND_PROMPT}'")
    return sorted({v.tags[registry.TAG_BASE_MODEL] for v in found if v.tags.get(registry.TAG_BASE_MODEL)})


def pending_migrations(base_models: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``(base model, version)`` pairs whose earlier prompts were never recycled into that version.

    A prompt counts as migrated into version ``v`` when some prompt tied to ``v`` records it
    as ``recycled_from``, whatever recycler made it.
    """
    pending = []
    for base in base_models or bases_with_prompts():
        for version in registry.base_versions(base):
            previous = previous_version_with_prompts(base, str(version.version))
            if previous is None:
                continue
            migrated = {v.tags.get(registry.TAG_RECYCLED_FROM) for v in registry.prompts_for(base, version.version)}
            sources = registry.prompts_for(base, previous)
            if any(registry.model_uri(s.name, s.version) not in migrated for s in sources):
                pending.append((base, str(version.version)))
    return pending


def reconcile(cfg: DictConfig | None = None, base_models: Iterable[str] | None = None) -> list[MigrationReport]:
    """Migrate every pending ``(base, version)``, oldest version first."""
    cfg = cfg if cfg is not None else compose(config_name="migrate")
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    return [migrate(base, version, cfg=cfg) for base, version in pending_migrations(base_models)]
