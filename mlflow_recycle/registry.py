"""Ties between soft prompts and base-model versions in the MLflow Model Registry.

Base models are registered ``mlflow.transformers`` models. A soft prompt's model version
carries the tags ``mlflow_recycle.base_model`` and ``mlflow_recycle.base_model_version``
naming the base version it was tuned (or recycled) for, so that "every prompt of base
version 1" is one registry query (:func:`prompts_for`), and the migration hook can find
what to recycle when version 2 appears.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

from . import soft_prompt
from .errors import RecycleError
from .models import BaseModelReference, apply_bos, gguf_source, load_pretrained, weights_digest
from .prompt import SoftPrompt
from .requirements import pinned_requirement
from .vocab import tokenizer_fingerprint

log = logging.getLogger(__name__)

TAG_KIND = "mlflow_recycle.kind"
TAG_BASE_MODEL = "mlflow_recycle.base_model"
TAG_BASE_VERSION = "mlflow_recycle.base_model_version"
TAG_FINGERPRINT = "mlflow_recycle.tokenizer_fingerprint"
TAG_DIM = "mlflow_recycle.embedding_dim"
TAG_DIGEST = "mlflow_recycle.weights_digest"
#: Where a base version's weights were registered from: a local directory or a hub id that PEFT can load.
TAG_WEIGHTS_FROM = "mlflow_recycle.weights_from"
TAG_RECYCLED_FROM = "mlflow_recycle.recycled_from"
TAG_RECYCLER = "mlflow_recycle.recycler"
TAG_GATE = "mlflow_recycle.gate"
TAG_STAGE = "mlflow_recycle.stage"
TAG_GATE_REASON = "mlflow_recycle.gate_reason"
METRIC_TAG_PREFIX = "mlflow_recycle.metric."
TAG_RECYCLER_CONFIG = "mlflow_recycle.recycler_config"
TAG_PROMPT_DIGEST = "mlflow_recycle.prompt_digest"
TAG_RECIPE = "mlflow_recycle.recipe"
TAG_GAIN_KEPT = "mlflow_recycle.gain_kept"
#: A migrated prompt's identity (source prompt version, base versions, policy): at most one version holds each.
TAG_MIGRATION_KEY = "mlflow_recycle.migration_key"
KIND_BASE, KIND_PROMPT = "base_model", "soft_prompt"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def model_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/name/version`` or ``models:/name@alias``."""
    match = _MODEL_URI.match(uri)
    if not match:
        raise RecycleError(
            f"{uri!r} is not a registered model URI; expected models:/<name>/<version> or models:/<name>@<alias>."
        )
    name, version = match["name"], match["version"]
    if version is None:
        version = MlflowClient().get_model_version_by_alias(name, match["alias"]).version
    return name, str(version)


def pinned(uri: str) -> str:
    """``models:/name@alias`` as the version it points to now (``models:/name/3``); any other URI as is."""
    if _MODEL_URI.match(uri) and "@" in uri:
        return model_uri(*parse_model_uri(uri))
    return uri


@contextmanager
def _run(run_name: str):
    """The active run, or a new one for a registry helper called outside any run."""
    if mlflow.active_run() is not None:
        yield mlflow.active_run()
    else:
        with mlflow.start_run(run_name=run_name) as run:
            yield run


@contextmanager
def _quiet(logger: str):
    """Only errors from ``logger`` while the block runs."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def filter_value(value: str) -> str:
    """``value`` escaped for a quoted string in an MLflow filter (``name = '...'``): the one escaping helper."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


# ---------------------------------------------------------------------- base models
def register_base_model(
    path: str,
    name: str,
    *,
    copy_weights: bool | None = None,
    bos: str | bool | None = None,
    recipe: Mapping[str, Any] | None = None,
    await_registration_for: int = 300,
) -> ModelVersion:
    """Register a local Hugging Face directory (or hub id) as a version of base model ``name``:
    the version that already holds these weights (found by their digest), or a new one.

    The version is tagged with its tokenizer fingerprint, embedding dim and weights digest
    so that prompts can be checked against it without downloading it.

    Args:
        copy_weights: copy the weights into the artifact store (an ``mlflow.transformers``
            model; the default for local directories), or register a reference: for a local
            directory its path and weights digest (a few hundred bytes; loading refuses
            weights that changed since), for a hub id ``mlflow.transformers`` with
            ``save_pretrained=False`` (the repository and commit; the default for hub ids).
            A GGUF file's conversion is referenced by default, with the GGUF file it came
            from: a machine without the conversion converts the file again.
        bos: the model config's ``bos`` (:func:`~mlflow_recycle.models.apply_bos`), kept
            with the version so that whoever loads it starts contexts the same way.
        recipe: the model's tuning recipe (the ``recipe:`` block of its ``conf/model`` entry), kept
            as the tag ``mlflow_recycle.recipe``: a migration into this version re-tunes with it.
    """
    existing = base_version_holding(path, name)
    if existing is not None:
        kept = json.dumps(dict(recipe or {}), sort_keys=True)
        if recipe and existing.tags.get(TAG_RECIPE) != kept:
            MlflowClient().set_model_version_tag(name, existing.version, TAG_RECIPE, kept)
        log.info("%s holds these weights already as version %s", name, existing.version)
        return existing
    if copy_weights is None:  # what users have: a hub id or a GGUF file is referenced, a directory copied
        copy_weights = Path(path).is_dir() and gguf_source(path) is None
    model, tokenizer = load_pretrained(path, dtype=None)  # keep the checkpoint's dtype
    apply_bos(tokenizer, bos)
    digest = weights_digest(path)
    tags = {
        TAG_KIND: KIND_BASE,
        TAG_FINGERPRINT: tokenizer_fingerprint(tokenizer),
        TAG_DIM: str(model.get_input_embeddings().weight.shape[1]),
        TAG_DIGEST: digest,
        TAG_WEIGHTS_FROM: str(Path(path).resolve()) if Path(path).is_dir() else path,
    }
    if recipe:
        tags[TAG_RECIPE] = json.dumps(dict(recipe), sort_keys=True)
    with _run(f"register {name}"):
        info = _log_base(path, name, model, tokenizer, digest, bos, copy_weights)
    # Registered with its tags in one call: a version is never seen without its digest.
    version = mlflow.register_model(info.model_uri, name, await_registration_for=await_registration_for, tags=tags)
    log.info(
        "Registered %s as %s version %s (%s)", path, name, version.version, "copy" if copy_weights else "reference"
    )
    return version


def _log_base(path: str, name: str, model, tokenizer, digest: str, bos, copy_weights: bool):
    """Log a base model in the active run: a reference to a local directory (its path and digest), or
    ``mlflow.transformers`` (the weights copied, or a hub id's repository and commit)."""
    if Path(path).is_dir() and not copy_weights:
        reference = {"path": str(Path(path).resolve()), "weights_digest": digest, **(gguf_source(path) or {})}
        if bos is not None:
            reference["bos"] = bos
        return mlflow.models.Model.log(artifact_path=None, name=f"base-{name}", flavor=BaseModelReference,
                                       reference=reference)  # fmt: skip
    # transformers 5 needs loaded components (not a path); explicit requirements skip a slow inference.
    # Its warnings about a model card and licence on the hub mean nothing for a local or offline model,
    # and a user cannot act on them: quiet for this call only.
    with _quiet("mlflow.transformers"):
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=f"base-{name}",
            task="text-generation",
            save_pretrained=copy_weights,
            pip_requirements=[pinned_requirement(p) for p in ("transformers", "torch", "safetensors")],
        )


def base_version_holding(path: str, name: str) -> ModelVersion | None:
    """The first version of base model ``name`` holding the weights at ``path`` (None: no version does)."""
    found = MlflowClient().search_model_versions(
        f"name = '{filter_value(name)}' AND tags.`{TAG_DIGEST}` = '{filter_value(weights_digest(path))}'"
    )
    return min(found, key=lambda v: int(v.version)) if found else None


def base_recipe(version: ModelVersion) -> dict[str, Any] | None:
    """The tuning recipe a base version carries (``mlflow_recycle.recipe``), or None."""
    text = version.tags.get(TAG_RECIPE)
    return json.loads(text) if text else None


def base_versions(name: str) -> list[ModelVersion]:
    """Every version of base model ``name``, oldest first."""
    return sorted(MlflowClient().search_model_versions(f"name = '{filter_value(name)}'"), key=lambda v: int(v.version))


def check_prompt_fits_base(prompt: SoftPrompt, base: ModelVersion) -> None:
    """Refuse a base version whose recorded dim or tokenizer differs from the prompt's."""
    dim, fingerprint = base.tags.get(TAG_DIM), base.tags.get(TAG_FINGERPRINT)
    prompt.check_fits(
        dim=int(dim) if dim else prompt.dim, fingerprint=fingerprint, model=f"{base.name!r} v{base.version}"
    )


# ---------------------------------------------------------------------- prompts
def prompt_tags(prompt: SoftPrompt, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """A prompt version's tags: its tie to a base version, its lineage and digest, then ``tags``."""
    tie = {
        TAG_KIND: KIND_PROMPT,
        TAG_BASE_MODEL: prompt.base_model or "",
        TAG_BASE_VERSION: prompt.base_model_version or "",
        TAG_FINGERPRINT: prompt.tokenizer_fingerprint or "",
        TAG_PROMPT_DIGEST: prompt.digest,
    }
    if prompt.recycler:
        tie.update(
            {
                TAG_RECYCLED_FROM: prompt.recycled_from or "",
                TAG_RECYCLER: prompt.recycler,
                TAG_RECYCLER_CONFIG: json.dumps(prompt.recycler_config, sort_keys=True),
            }
        )
    return {**tie, **(tags or {})}


def log_prompt(
    prompt: SoftPrompt,
    name: str = "prompt",
    registered_model_name: str | None = None,
    *,
    tags: Mapping[str, str] | None = None,
    before_register: Callable[[], None] | None = None,
    **kwargs: Any,
) -> ModelVersion | mlflow.models.model.ModelInfo:
    """Log ``prompt`` with the flavor and, with ``registered_model_name``, register it tied to its base
    (:func:`register_prompt`, which calls ``before_register`` first). The logged model and the run
    (``mlflow_recycle.<name>.base_model``, ``...base_model_version``) carry the tie. Returns the model version when
    registered, else the ``ModelInfo``.
    """
    tie = prompt_tags(prompt, tags)
    await_registration_for = kwargs.pop("await_registration_for", DEFAULT_AWAIT_MAX_SLEEP_SECONDS)
    with _run(f"log {name}"):
        info = soft_prompt.log_model(prompt, name=name, tags=tie, **kwargs)
        # the run names the tie only; the logged model and the version carry every tag
        tied = (TAG_BASE_MODEL, TAG_BASE_VERSION)
        mlflow.set_tags({f"mlflow_recycle.{name}.{key.split('.', 1)[1]}": tie[key] for key in tied if tie.get(key)})
    if registered_model_name is None:
        return info
    return register_prompt(
        info.model_uri,
        registered_model_name,
        prompt,
        tags=tags,
        before_register=before_register,
        await_registration_for=await_registration_for,
    )


def register_prompt(
    logged_uri: str,
    registered_model_name: str,
    prompt: SoftPrompt,
    *,
    tags: Mapping[str, str] | None = None,
    once: bool = False,
    before_register: Callable[[], None] | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
) -> ModelVersion:
    """Register the logged ``prompt`` as a version of ``registered_model_name``.

    The version is created with its tie, lineage and ``tags`` in one call, so a crash can
    never leave an untagged (unfindable, later duplicated) version. With ``once``, a version
    that already holds the same prompt (same tensor, base version and task: e.g. the source
    prompt of each job of a multirun, or a job run again) is returned instead of a new one.
    A migrated prompt (``tags`` with a :data:`TAG_MIGRATION_KEY`) is registered at most once
    per key, whatever earlier versions hold (:func:`_register_keyed`). ``before_register`` is
    called right before the version is created (a migration's lease check): it raises to stop.
    """
    tie = prompt_tags(prompt, tags)
    if tie.get(TAG_MIGRATION_KEY):
        return _register_keyed(logged_uri, registered_model_name, tie, before_register, await_registration_for)
    found = once and MlflowClient().search_model_versions(
        f"name = '{filter_value(registered_model_name)}' AND "
        f"tags.`{TAG_PROMPT_DIGEST}` = '{filter_value(tie[TAG_PROMPT_DIGEST])}'"
    )
    if found:
        version = min(found, key=lambda v: int(v.version))
        log.info("%s already holds this prompt as version %s: not registered again", version.name, version.version)
        return version
    if before_register is not None:
        before_register()
    return mlflow.register_model(
        logged_uri, registered_model_name, await_registration_for=await_registration_for, tags=tie
    )


def versions_with_key(name: str, key: str) -> list[ModelVersion]:
    """The versions of ``name`` holding migration ``key`` (failed registrations aside), lowest first: the
    first is the one that counts; any other is a duplicate a racing worker has not deleted yet."""
    found = MlflowClient().search_model_versions(
        f"name = '{filter_value(name)}' AND tags.`{TAG_MIGRATION_KEY}` = '{filter_value(key)}'"
    )
    return sorted((v for v in found if v.status != "FAILED_REGISTRATION"), key=lambda v: int(v.version))


def _register_keyed(
    logged_uri: str,
    name: str,
    tie: Mapping[str, str],
    before_register: Callable[[], None] | None,
    await_registration_for: int,
) -> ModelVersion:
    """A migrated prompt's version, idempotent by itself: the key is looked up right before the
    version is created (a retry, or another worker that finished the same migration, finds it),
    and again right after: if two workers raced past the first look-up, the lowest version
    holding the key stands, and the worker that created another deletes its own."""
    key = tie[TAG_MIGRATION_KEY]
    if before_register is not None:
        before_register()
    existing = versions_with_key(name, key)
    if existing:
        log.info("%s version %s already holds migration %s: not registered again", name, existing[0].version, key)
        return existing[0]
    created = mlflow.register_model(logged_uri, name, await_registration_for=await_registration_for, tags=dict(tie))
    first = next(iter(versions_with_key(name, key)), created)
    if int(first.version) < int(created.version):
        MlflowClient().delete_model_version(name, created.version)
        log.warning(
            "%s: another worker registered migration %s first, as version %s; deleted the duplicate version %s",
            name,
            key,
            first.version,
            created.version,
        )
        return first
    return created


#: The metrics a prompt version shows as tags (``mlflow_recycle.metric.*``), to sort versions by; its
#: description reads the bar, the steps and the cost, its run holds every metric.
VERSION_METRICS = ("validation/recycled_accuracy", "test/recycled_accuracy", "policy/compute_fraction")


def outcome_tags(outcome: Any, metrics: Mapping[str, float] | None = None) -> dict[str, str]:
    """Tags of a migrated prompt version: the gate, the stage that passed, the reason when it failed,
    and the few ``metrics`` a person compares versions by (:data:`VERSION_METRICS`) as
    ``mlflow_recycle.metric.*``; the version's run holds every metric (``outcome``: a ``PolicyOutcome``)."""
    tags = {TAG_GATE: outcome.gate, TAG_STAGE: outcome.stage or "none"}
    if outcome.gain_kept is not None:  # sortable: the share of the source prompt's gain kept on validation
        tags[TAG_GAIN_KEPT] = f"{outcome.gain_kept:.3f}"
    if outcome.reason:
        tags[TAG_GATE_REASON] = outcome.reason[:5000]
    # six significant digits: accuracies and fractions as read, FLOPs (1e12 and up) without a row of zeros
    shown = {name: value for name, value in (metrics or {}).items() if name in VERSION_METRICS}
    tags.update({f"{METRIC_TAG_PREFIX}{name}": f"{value:.6g}" for name, value in shown.items()})
    return tags


def prompts_for(base_model: str, version: str | int, *, completed: bool = False) -> list[ModelVersion]:
    """Every registered soft-prompt version tied to ``base_model`` version ``version``.

    ``completed``: only the versions whose registration completed (:func:`_completed`), and of
    the versions holding one migration key only the first (:func:`versions_with_key`).
    """
    found = MlflowClient().search_model_versions(
        f"tags.`{TAG_BASE_MODEL}` = '{filter_value(base_model)}' AND "
        f"tags.`{TAG_BASE_VERSION}` = '{filter_value(str(version))}'"
    )
    prompts = sorted((v for v in found if v.tags.get(TAG_KIND) == KIND_PROMPT), key=lambda v: (v.name, int(v.version)))
    if completed:
        seen: set[tuple[str, str]] = set()
        completed_prompts = []
        for v in filter(_completed, prompts):  # lowest version first, so the first per key is the one that counts
            key = v.tags.get(TAG_MIGRATION_KEY)
            if key and (v.name, key) in seen:
                log.info("Ignoring %s version %s: a duplicate of migration %s", v.name, v.version, key)
                continue
            seen.add((v.name, key or ""))
            completed_prompts.append(v)
        prompts = completed_prompts
    return prompts


def _completed(version: ModelVersion) -> bool:
    """Whether the registration of ``version`` completed: it is READY, and it is a migrated prompt
    (its migration key tag is set in the call that creates it, the migration's last step, so
    whatever became of the run, the version stands: a worker killed right after registering
    leaves that run RUNNING) or its run did not end FAILED or KILLED (a prompt registered by a
    run that then broke is not something to migrate; other code may register before its end)."""
    if version.status != "READY":
        return False
    if version.tags.get(TAG_MIGRATION_KEY) or not version.run_id:
        return True
    try:
        status = MlflowClient().get_run(version.run_id).info.status
    except mlflow.exceptions.MlflowException:  # the run was deleted: the version stands on its own
        return True
    if status in ("FAILED", "KILLED"):
        log.info("Ignoring %s version %s: its run %s ended %s", version.name, version.version, version.run_id, status)
        return False
    return True


def base_of(prompt_uri: str) -> tuple[str, str]:
    """``(base model name, version)`` a registered prompt (``models:/name/version`` or ``@alias``) is tied to."""
    name, version = parse_model_uri(prompt_uri)
    tags = MlflowClient().get_model_version(name, version).tags
    if not tags.get(TAG_BASE_MODEL) or not tags.get(TAG_BASE_VERSION):
        raise RecycleError(
            f"{prompt_uri} is not tied to a base-model version (no {TAG_BASE_MODEL} / {TAG_BASE_VERSION} tags): "
            "register prompts with mlflow_recycle.registry.log_prompt."
        )
    return tags[TAG_BASE_MODEL], tags[TAG_BASE_VERSION]


def load_prompt(uri: str) -> SoftPrompt:
    """A prompt from a registry/run URI (``models:/``, ``runs:/``), a logged model directory or a prompt directory."""
    local = Path(uri)
    if local.is_dir() and not (local / "MLmodel").is_file():
        return SoftPrompt.load(local)
    try:
        return soft_prompt.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        first = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        raise RecycleError(
            f"Cannot load the prompt {uri!r} from {mlflow.get_tracking_uri()}: {first} "
            "(a registered prompt is models:/<name>/<version> or models:/<name>@<alias>; "
            "the MLflow UI's Models page lists them)."
        ) from exc


def tie(prompt: SoftPrompt, base: ModelVersion) -> SoftPrompt:
    """``prompt`` pointed at a registered base version (name, version, ``models:/`` URI). Where PEFT loads
    the base from (``base_model_path``) stays the prompt's own, or becomes where the version's weights were
    registered from: a recycled prompt knows no path of its new base."""
    return prompt.replace(
        base_model=base.name, base_model_version=str(base.version), base_model_uri=model_uri(base.name, base.version),
        base_model_path=prompt.base_model_path or base.tags.get(TAG_WEIGHTS_FROM),
    )  # fmt: skip


__all__ = [
    "base_of",
    "base_versions",
    "check_prompt_fits_base",
    "base_recipe",
    "base_version_holding",
    "filter_value",
    "load_prompt",
    "log_prompt",
    "model_uri",
    "parse_model_uri",
    "pinned",
    "prompts_for",
    "register_base_model",
    "register_prompt",
    "tie",
    "versions_with_key",
    "weights_digest",
]
