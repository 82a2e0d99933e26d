"""Automatic migration: recycle every prompt tied to one base-model version onto a newer one.

``migrate("imdb-lm", to_version=2)`` finds every soft-prompt version tied to the newest
earlier version of ``imdb-lm`` that has prompts and runs each through the migration
policy (:mod:`mlflow_recycle.policy`, ``conf/policy/``): recycle (each recycler fitted
once per base pair, or reused from an earlier migration's run), then, until the prompt
passes the gate on the new base's validation split, label-free refinement and re-tuning
from the recycled start, each within its budget. The result is registered as a new
version of the same prompt model, tied to version 2, with the stage that passed, each
stage's steps, seconds and gate value, and the test accuracy next to it (reported, never
deciding). The configured alias moves only to a version that passes; one that fails every
stage is still registered and tagged ``failed`` with the reason, so nothing is dropped.

Idempotent: each migrated version is created with a migration key (prompt version, base
versions, policy and anchors) in its tags, so running the same migration again, after a
crash or from a duplicate event, creates no second version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from . import registry
from .config import compose
from .errors import RecycleError
from .evaluation import verdict_metrics
from .models import LoadedModel, configure_threads, load_base_model
from .policy import (
    DEGRADED,
    FAILED,
    PASSED,
    UNEVALUATED,
    Policy,
    PolicyOutcome,
    build_policy,
    build_transfer,
    cost_metrics,
    run_policy,
)
from .policy.transfer import MapMaker
from .prompt import SoftPrompt
from .recyclers import Recycler, load_recycler
from .tracking import configure

log = logging.getLogger(__name__)

TAG_MIGRATION_KEY = registry.TAG_MIGRATION_KEY
#: Called before each side effect of a migration; raises to stop it (a worker's lease check).
Guard = Callable[[], None]
TAG_RECYCLER_KEY = "mlflow_recycle.recycler_key"
TAG_GATE, TAG_STAGE, TAG_GATE_REASON = registry.TAG_GATE, registry.TAG_STAGE, registry.TAG_GATE_REASON
GATE_PASSED, GATE_FAILED, GATE_UNEVALUATED = PASSED, FAILED, UNEVALUATED


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
    stage: str | None = None  # the policy stage that passed the gate
    reason: str = ""  # why it failed every stage, or was not judged


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

    def lines(self) -> list[str]:
        """One line per prompt: where it went, the gate, the stage, and the reason when it failed."""
        out = []
        for p in self.prompts:
            how = f" at {p.stage}" if p.stage else ""
            why = f": {p.reason}" if p.reason and p.gate != GATE_PASSED else ""
            new = "" if p.created else " (existing)"
            out.append(f"{p.source} -> {p.target}{new}: {p.gate}{how}{why}")
        return out


def _digest(payload: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def policy_settings(cfg: DictConfig) -> dict[str, Any]:
    """What determines a migrated prompt: the policy (gate, stages, budgets) and the anchors."""
    return {
        "policy": Policy.from_config(cfg.policy).to_dict(),
        "anchors": OmegaConf.to_container(cfg.anchors, resolve=True),
        "evaluate": bool(cfg.evaluate),
    }


def migration_key(source: ModelVersion, base_model: str, from_version: str, to_version: str, cfg: DictConfig) -> str:
    """Identity of one prompt's migration: same key, same result, so never registered twice."""
    payload = {"prompt": source.name, "version": str(source.version), "base": base_model}
    payload.update({"from": from_version, "to": to_version, **policy_settings(cfg)})
    return _digest(payload)


def sources(base_model: str, version: str | int, include_failed: bool = False) -> list[ModelVersion]:
    """The prompts of ``base_model`` v``version`` a migration moves: those a user keeps there, every
    completed version but those whose own gate failed on that base (``include_failed``: those too)."""
    kept = registry.prompts_for(base_model, version, completed=True)
    return [v for v in kept if include_failed or v.tags.get(TAG_GATE) != GATE_FAILED]


def previous_version_with_prompts(base_model: str, to_version: str, include_failed: bool = False) -> str | None:
    """The newest version of ``base_model`` before ``to_version`` that has prompts to migrate."""
    earlier = [v for v in registry.base_versions(base_model) if int(v.version) < int(to_version)]
    for version in sorted(earlier, key=lambda v: int(v.version), reverse=True):
        if sources(base_model, version.version, include_failed):
            return str(version.version)
    return None


def _existing(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    """The version of ``name`` holding migration ``key``, if one was registered (the first one)."""
    found = registry.versions_with_key(name, key)
    return found[0] if found else None


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
    """One (base, from, to, policy) migration: loads both versions once, fits each recycler once."""

    def __init__(
        self, cfg: DictConfig, base_model: str, from_version: str, to_version: str, sources: Sequence[ModelVersion]
    ) -> None:
        self.cfg, self.base_model, self.from_version, self.to_version = cfg, base_model, from_version, to_version
        self.client = MlflowClient()
        target_base = self.target_base = self.client.get_model_version(base_model, to_version)
        self._alias_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # re-tuning on the new base uses its recipe (the tag its registration kept), as the job does
        recipe = registry.base_recipe(target_base)
        self.policy = build_policy(cfg, {"name": f"{base_model} v{to_version}", "recipe": recipe})
        self._prompts: dict[str, SoftPrompt] = {}
        # every prompt of from_version, those migrated before a crash too: a map trained on behaviour learns
        # from the same prompts on a retry, so it is found (reused) rather than trained again
        prompts = [prompt for prompt in map(self._loaded, sources) if prompt is not None]
        self.transfer = build_transfer(
            cfg, self._side(from_version), self._side(to_version), prompts=prompts, store=self._logged
        )

    def _loaded(self, source: ModelVersion) -> SoftPrompt | None:
        """:meth:`prompt`, or None (logged) when it cannot be read: migrating it then says why."""
        try:
            return self.prompt(source)
        except (RecycleError, MlflowException, OSError) as exc:
            log.warning("Cannot read %s v%s: %s", source.name, source.version, exc)
            return None

    def _side(self, version: str) -> LoadedModel:
        uri = registry.model_uri(self.base_model, version)
        model, tokenizer = load_base_model(uri)
        return LoadedModel(f"{self.base_model} v{version}", uri, model, tokenizer, self.base_model)

    def prompt(self, source: ModelVersion) -> SoftPrompt:
        """A source prompt version's prompt, loaded once per migration."""
        uri = registry.model_uri(source.name, source.version)
        if uri not in self._prompts:
            self._prompts[uri] = registry.load_prompt(uri)
        return self._prompts[uri]

    def _logged(self, key: str, run_name: str, make: MapMaker) -> Recycler:
        """The map logged under ``key`` (the transfer's key for it, with this base pair and anchors) by an
        earlier run, or ``make()``'s, logged now in a nested run with what making it cost, tagged last."""
        anchors = OmegaConf.to_container(self.cfg.anchors, resolve=True)
        pair = {"base": self.base_model, "from": self.from_version, "to": self.to_version, "anchors": anchors}
        key = _digest({**pair, "map": key})
        earlier = mlflow.search_runs(
            search_all_experiments=True, filter_string=f"tags.`{TAG_RECYCLER_KEY}` = '{key}'", output_format="list"
        )
        if earlier:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(
                    run_id=earlier[0].info.run_id, artifact_path="recycler", dst_path=tmp
                )
                recycler = load_recycler(path)
            log.info("Reusing the %s recycler of run %s (%s)", recycler.name, earlier[0].info.run_id, run_name)
        else:
            with mlflow.start_run(run_name=run_name, nested=True):
                recycler, metrics = make()
                mlflow.log_metrics(metrics)
                if recycler.behaviour is not None:
                    mlflow.log_dict(recycler.behaviour, "behaviour.json")
                with tempfile.TemporaryDirectory() as tmp:
                    mlflow.log_artifacts(str(recycler.save(tmp)), "recycler")
                mlflow.set_tag(TAG_RECYCLER_KEY, key)  # after the artifact: a tagged run always has it
        return recycler

    def report_tests(self, measured: Sequence[Measured]) -> None:
        """Test accuracy of each measured prompt next to the new base's baselines, into its metrics: reported,
        never deciding. The prompts of one task and length are scored together, in passes of several."""
        if "test" not in self.cfg.eval.splits:
            return
        transfer, groups = self.transfer, {}
        for m in measured:
            if m.outcome.gate != GATE_UNEVALUATED:
                groups.setdefault((m.prompt.task, m.prompt.length), []).append(m)
        for group in groups.values():
            data = transfer.data(transfer.target, group[0].prompt, limit_test=self.cfg.eval.limit_test)
            baselines = transfer.baselines(transfer.target, group[0].prompt, "test", data)
            reports = transfer.evaluator("test").reports(
                transfer.target, data, [m.prompt.embeddings for m in group], "recycled"
            )
            for m, report in zip(group, reports, strict=True):
                accuracy = {split: one.accuracy for split, one in report.items()}
                m.metrics.update(verdict_metrics({"recycled": accuracy}, baselines, "recycled", ["test"]))

    def measure(self, source: ModelVersion, key: str) -> Measured:
        """The policy on ``source``'s prompt and what it measured, in memory: nothing logged yet (its test
        report comes with its peers', :meth:`report_tests`)."""
        source_uri = registry.model_uri(source.name, source.version)
        prompt = self.prompt(source)
        outcome = run_policy(self.policy, self.transfer, prompt, source_uri, judge=self.cfg.evaluate)
        metrics = outcome.metrics()
        if outcome.baselines is not None:
            split = self.policy.gate.split
            metrics[f"{split}/recycled_accuracy"] = outcome.score
            metrics[f"{split}/best_baseline_accuracy"] = outcome.baselines.best(split)
        metrics.update(cost_metrics(outcome, prompt, self.transfer.target))
        return Measured(source, key, registry.tie(outcome.prompt, self.target_base), outcome, metrics)

    def measured(self, todo: Sequence[tuple[ModelVersion, str]], guard: Guard | None, failures: list[str]):
        """Each prompt of ``todo`` measured, in order, their test reports made a chunk of
        ``eval.prompts_per_pass`` at a time; a prompt that cannot be migrated goes to ``failures``."""
        size = max(int(self.cfg.eval.get("prompts_per_pass") or 1), 1)
        for start in range(0, len(todo), size):
            chunk = []
            for source, key in todo[start : start + size]:
                if guard is not None:
                    guard()
                try:
                    chunk.append(self.measure(source, key))
                except RecycleError as exc:
                    failures.append(_failed(source, exc))
            self.report_tests(chunk)
            yield from chunk

    def publish(self, measured: Measured, parent: mlflow.entities.Run, guard: Guard | None = None) -> MigratedPrompt:
        """Log and register one measured prompt, in its run under the migration's ``parent`` run: from any
        thread (the uploads of several prompts run side by side)."""
        source, outcome, metrics = measured.source, measured.outcome, measured.metrics
        source_uri = registry.model_uri(source.name, source.version)
        run_name = f"{source.name} v{source.version} -> {self.base_model} v{self.to_version}"
        tags = {TAG_MIGRATION_KEY: measured.key, **registry.outcome_tags(outcome)}
        with mlflow.start_run(
            run_name=run_name, parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id
        ):
            mlflow.set_tags(tags)
            tags = {**tags, **registry.outcome_tags(outcome, metrics)}
            if guard is not None:
                guard()  # a worker that lost its lease logs and registers nothing more
            logged = registry.log_prompt(
                measured.prompt, "recycled_prompt", tags=tags, tokenizer=self.transfer.target.tokenizer
            )
            # after the model: one call puts them on the run and the logged model (MLflow would copy each
            # metric's history to a model logged after them, one call per metric)
            mlflow.log_metrics(metrics, model_id=logged.model_id)
            version = registry.register_prompt(
                logged.model_uri, source.name, measured.prompt, tags=tags, before_register=guard
            )
        log.info("%s -> %s version %s: %s", source_uri, version.name, version.version, outcome.summary())
        about = outcome.description(source_uri, metrics.get("policy/compute_fraction"))
        self.client.update_model_version(version.name, version.version, description=about)
        with self._alias_lock(version.name):
            _move_alias(self.client, version, self.cfg.alias)
        target_uri = registry.model_uri(version.name, version.version)
        return MigratedPrompt(source_uri, target_uri, True, outcome.gate, metrics, outcome.stage, outcome.reason)

    def _alias_lock(self, name: str) -> threading.Lock:
        """One lock per prompt model: two versions of one model never move its alias at once."""
        with self._locks_lock:
            return self._alias_locks.setdefault(name, threading.Lock())


@dataclass
class Measured:
    """One prompt through the policy, with what it measured, before anything of it is logged."""

    source: ModelVersion
    key: str
    prompt: SoftPrompt  # the migrated prompt, tied to the new base version
    outcome: PolicyOutcome
    metrics: dict[str, float]


def migrate(
    base_model: str,
    to_version: str | int,
    from_version: str | int | None = None,
    *,
    cfg: DictConfig | None = None,
    overrides: Sequence[str] = (),
    guard: Guard | None = None,
) -> MigrationReport:
    """Recycle every prompt of ``from_version`` (default: the newest earlier version with prompts) to ``to_version``.

    ``cfg`` is the ``conf/migrate.yaml`` config (composed with ``overrides`` when not given).
    ``guard`` is called before each side effect (a run, a registration) and raises to stop the
    migration there: the hook's worker checks that its lease on the job is still its own.
    Raises :class:`MigrationError` after migrating all others if some prompts failed.
    """
    cfg = cfg if cfg is not None else compose(overrides, config_name="migrate")
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    configure_threads(cfg.get("threads"))
    start, to_version = time.perf_counter(), str(to_version)
    known = {str(v.version) for v in registry.base_versions(base_model)}
    if to_version not in known:
        raise RecycleError(
            f"{base_model!r} has no version {to_version} in {mlflow.get_tracking_uri()}"
            + (f" (its versions: {', '.join(sorted(known, key=int))})." if known else ": no such registered model.")
        )
    if from_version is None:
        from_version = previous_version_with_prompts(base_model, to_version, cfg.include_failed)
    from_version = None if from_version is None else str(from_version)
    report = MigrationReport(base_model, to_version, from_version, Policy.from_config(cfg.policy).label)
    if from_version is None:
        log.info("No version of %s before %s has prompts: nothing to migrate", base_model, to_version)
        return report
    held = sources(base_model, from_version, cfg.include_failed)  # a map trained on behaviour learns from all
    keyed = in_shard([(s, migration_key(s, base_model, from_version, to_version, cfg)) for s in held], cfg.get("shard"))
    todo = _not_yet_migrated(keyed, cfg.alias, report)
    log.info("%s v%s -> v%s: %d prompts, %d to migrate", base_model, from_version, to_version, len(keyed), len(todo))
    if todo:
        _run_migration(cfg, report, held, todo, guard)
    report.seconds = time.perf_counter() - start
    return report


def in_shard(keyed: list[tuple[ModelVersion, str]], shard: str | None) -> list[tuple[ModelVersion, str]]:
    """The prompts of shard ``"i/n"`` (all of them for None): those whose migration key falls in shard i."""
    if shard is None:
        return keyed
    parts = str(shard).split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not int(parts[0]) < int(parts[1]):
        raise RecycleError(f"shard is 'i/n' with 0 <= i < n, e.g. shard=0/2; got {shard!r}.")
    index, count = map(int, parts)
    return [(source, key) for source, key in keyed if int(key.split(":")[-1][:8], 16) % count == index]


def _not_yet_migrated(keyed: list[tuple[ModelVersion, str]], alias: str | None, report: MigrationReport):
    """The ``(source, key)`` pairs no version holds yet; those one does go into ``report`` as they are."""
    client, todo = MlflowClient(), []
    for source, key in keyed:
        existing = _existing(client, source.name, key)
        if existing is None:
            todo.append((source, key))
            continue
        _move_alias(client, existing, alias)  # finish what a crashed attempt may have left
        tags = existing.tags
        report.prompts.append(MigratedPrompt(
            registry.model_uri(source.name, source.version), registry.model_uri(existing.name, existing.version),
            False, tags.get(TAG_GATE, ""), stage=tags.get(TAG_STAGE), reason=tags.get(TAG_GATE_REASON, ""),
        ))  # fmt: skip
    return todo


def _run_migration(cfg: DictConfig, report: MigrationReport, held, todo, guard: Guard | None) -> None:
    """Migrate ``todo`` in one run (``held``: every source prompt, the maps trained on behaviour learn from)."""
    base_model, from_version, to_version = report.base_model, report.from_version, report.to_version
    failures = []
    tags = {"mlflow_recycle.job": "migrate", "mlflow_recycle.base_model": base_model}
    if guard is not None:
        guard()
    with mlflow.start_run(run_name=f"migrate {base_model} v{from_version} -> v{to_version}", tags=tags):
        # "migrated_from": the resolved version (an MLproject run already logged the requested one)
        params = {"base_model": base_model, "to_version": to_version, "migrated_from": from_version}
        migration = _Migration(cfg, base_model, from_version, to_version, held)
        migration.transfer.migrating = [p for p in (migration._loaded(s) for s, _ in todo) if p is not None]
        mlflow.log_params({**params, "policy": migration.policy.label})
        mlflow.log_dict(migration.policy.to_dict(), "policy.json")
        parent = mlflow.active_run()
        with ThreadPoolExecutor(max(int(cfg.get("uploads") or 1), 1), thread_name_prefix="upload") as uploads:
            published = [  # the policy, one prompt after another; each prompt's upload in the pool
                (measured.source, uploads.submit(migration.publish, measured, parent, guard))
                for measured in migration.measured(todo, guard, failures)
            ]
            for source, upload in published:
                if guard is not None:
                    guard()  # a lease an upload found lost ends this run KILLED here, as the worker expects
                try:
                    report.prompts.append(upload.result())
                except RecycleError as exc:
                    failures.append(_failed(source, exc))
        mlflow.log_metrics(_totals(report.prompts))
        lines = "\n".join(report.lines())
        mlflow.log_text(lines + "\n", "migration_report.txt")
        mlflow.set_tag(MLFLOW_RUN_NOTE, f"```\n{lines}\n```")  # the run's Description in the UI
    if failures:
        raise MigrationError(f"{len(failures)} of {len(todo)} prompts were not migrated: " + "; ".join(failures))


def _failed(source: ModelVersion, exc: RecycleError) -> str:
    log.error("Cannot migrate %s v%s: %s", source.name, source.version, exc)
    return f"{source.name} v{source.version}: {exc}"


def _totals(prompts: list[MigratedPrompt]) -> dict[str, float]:
    """The migration's compute, per stage and in total, next to re-tuning every prompt from scratch."""
    created = [p for p in prompts if p.created]
    totals: dict[str, float] = {"migrated_prompts": len(created)}
    totals["passed_prompts"] = sum(p.gate == GATE_PASSED for p in created)
    totals["degraded_prompts"] = sum(p.gate == DEGRADED for p in created)
    for name in sorted({k for p in created for k in p.metrics if k.endswith(("/steps", "/seconds", "/flops"))}):
        if name.startswith(("policy/", "retune_reference/")):
            totals[f"total/{name}"] = sum(p.metrics.get(name, 0.0) for p in created)
    for kind, fraction in (("seconds", "cost_fraction"), ("flops", "compute_fraction")):
        totals[f"total/policy/map_{kind}"] = sum(p.metrics.get(f"policy/map_{kind}", 0.0) for p in created)
        compared = [p.metrics for p in created if p.metrics.get(f"retune_reference/{kind}")]  # prompts with a reference
        if compared:  # the maps' fits and trainings included: they are paid for these prompts
            spent = sum(m[f"policy/{kind}"] + m.get(f"policy/map_{kind}", 0.0) for m in compared)
            totals[f"total/{fraction}"] = spent / sum(m[f"retune_reference/{kind}"] for m in compared)
    return totals


# ---------------------------------------------------------------------- reconcile
def bases_with_prompts() -> list[str]:
    """Names of the base models that have soft prompts tied to some version."""
    found = MlflowClient().search_model_versions(f"tags.`{registry.TAG_KIND}` = '{registry.KIND_PROMPT}'")
    return sorted({v.tags[registry.TAG_BASE_MODEL] for v in found if v.tags.get(registry.TAG_BASE_MODEL)})


def pending_migrations(base_models: Iterable[str] | None = None, include_failed: bool = False) -> list[tuple[str, str]]:
    """``(base model, version)`` pairs whose earlier prompts were never recycled into that version.

    A prompt counts as migrated into version ``v`` when some completed prompt version tied to ``v``
    (:func:`~mlflow_recycle.registry.prompts_for`) records it as ``recycled_from``, whatever
    recycler made it; every completed prompt of the earlier version is a source, those whose
    migration registered them just before a crash included.
    """
    pending = []
    for base in base_models or bases_with_prompts():
        for version in registry.base_versions(base):
            previous = previous_version_with_prompts(base, str(version.version), include_failed)
            if previous is None:
                continue
            completed = registry.prompts_for(base, version.version, completed=True)
            migrated = {v.tags.get(registry.TAG_RECYCLED_FROM) for v in completed}
            if any(
                registry.model_uri(s.name, s.version) not in migrated for s in sources(base, previous, include_failed)
            ):
                pending.append((base, str(version.version)))
    return pending


def reconcile(
    cfg: DictConfig | None = None, base_models: Iterable[str] | None = None, *, guard: Guard | None = None
) -> list[MigrationReport]:
    """Migrate every pending ``(base, version)``, oldest version first (``guard``: as :func:`migrate`'s)."""
    cfg = cfg if cfg is not None else compose(config_name="migrate")
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    pending = pending_migrations(base_models, cfg.include_failed)
    return [migrate(base, version, cfg=cfg, guard=guard) for base, version in pending]
