"""The ``soft_prompt`` MLflow flavor: log, register and load soft prompts.

Laid out like MLflow's built-in flavors (``save_model``, ``log_model``, ``load_model``,
``_load_pyfunc``), with the same parameters and meanings as
``mlflow.sentence_transformers``: ``code_paths``, ``signature`` (``False`` for none),
``input_example``, the environment arguments, ``metadata``, ``extra_files``,
``model_config``, and for ``log_model`` ``name`` (``artifact_path`` is its deprecated
alias), ``registered_model_name``, ``await_registration_for``, ``params``, ``tags``, ...

The model directory holds the prompt in the PEFT prompt-tuning layout (under
``prompt/``, so the artifact also loads with ``peft.PeftModel.from_pretrained``), and the
MLmodel's ``soft_prompt`` section records the tie to the base model (registered name,
version, URI, tokenizer fingerprint), the shape, the task and the lineage.

As a pyfunc, a soft prompt classifies text with its base model::

    model = mlflow.pyfunc.load_model("models:/sentiment-prompt/3")
    model.predict(pd.DataFrame({"text": ["a gripping, beautiful film"]}), params={"batch_size": 8})
    #    label label_name  score_bad  score_great
    # 0      1      great     -4.125       -1.879

The base model is loaded from the prompt's ``base_model_uri`` (``models:/name/version`` of
an ``mlflow.transformers`` model, a local directory or a hub id; ``model_config``'s
``base_model_uri`` overrides it) once per process, on the first prediction
(:func:`mlflow_recycle.models.load_base_model`). Logging never loads it: MLflow's check
that the input example can be served would, so it is skipped (the example is still stored).

A logged prompt's requirements name this package in a form a fresh serving environment can
install: from a package index, or as a wheel in the model's ``wheels/`` folder
(:func:`mlflow_recycle.requirements.package_requirement`).
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
import yaml
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _generate_mlflow_version_pinning,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _copy_extra_files,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

from .errors import PromptArtifactError, RecycleError
from .models import load_base_model
from .prompt import SoftPrompt
from .prompted_lm import PromptedLM, TaskEncoder
from .requirements import package_requirement, pinned_requirement
from .vocab import tokenizer_fingerprint

FLAVOR_NAME = "soft_prompt"
PROMPT_DATA_DIR = "prompt"
DEFAULT_BATCH_SIZE = 32
#: Keys of ``model_config`` (pyfunc inference settings, overridable at ``mlflow.pyfunc.load_model``).
MODEL_CONFIG_KEYS = ("base_model_uri",)


def get_default_pip_requirements() -> list[str]:
    """What serving a soft prompt needs besides MLflow and this package (which ``save_model`` adds)."""
    return [pinned_requirement(package) for package in ("torch", "transformers", "safetensors")]


def get_default_conda_env() -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def as_soft_prompt(prompt: Any) -> SoftPrompt:
    """Accept a :class:`SoftPrompt`, a prompt directory (ours or PEFT's) or a PEFT prompt-tuning model."""
    if isinstance(prompt, SoftPrompt):
        return prompt
    if isinstance(prompt, (str, os.PathLike)):
        return SoftPrompt.load(prompt)
    if hasattr(prompt, "peft_config") and hasattr(prompt, "save_pretrained"):  # a peft.PeftModel
        with tempfile.TemporaryDirectory() as tmp:
            prompt.save_pretrained(tmp)
            return SoftPrompt.load(tmp)
    raise RecycleError(
        f"Cannot log a {type(prompt).__name__} as a soft prompt: pass a SoftPrompt, a prompt directory "
        "(adapter_config.json + adapter_model.safetensors) or a peft.PeftModel with a prompt-tuning adapter."
    )


def default_signature(prompt: SoftPrompt) -> ModelSignature:
    """``text`` in; ``label``, ``label_name`` and one ``score_<label>`` per class out; param ``batch_size``."""
    labels = prompt.task.labels if prompt.task else ()
    outputs = [ColSpec("long", "label"), ColSpec("string", "label_name")]
    outputs += [ColSpec("double", f"score_{label}") for label in labels]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
    )


def flavor_config(prompt: SoftPrompt) -> dict[str, Any]:
    """The MLmodel ``soft_prompt`` section: everything but the tensor, searchable at a glance."""
    from . import __version__

    task = prompt.task
    return {
        "prompt_data": PROMPT_DATA_DIR,
        "mlflow_recycle_version": __version__,
        "base_model": prompt.base_model,
        "base_model_version": prompt.base_model_version,
        "base_model_uri": prompt.base_model_uri,
        "tokenizer_fingerprint": prompt.tokenizer_fingerprint,
        "length": prompt.length,
        "dim": prompt.dim,
        "task_type": prompt.task_type,
        "init": prompt.init,
        "task": task.name if task else None,
        "template": task.template if task else None,
        "verbalizers": list(task.verbalizers) if task else None,
        "recycled_from": prompt.recycled_from,
        "recycler": prompt.recycler,
        "recycler_config": prompt.recycler_config or None,
    }


def _check_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    if unknown := sorted(set(model_config) - set(MODEL_CONFIG_KEYS)):
        raise RecycleError(
            f"Unknown soft_prompt model_config key(s) {unknown}; the pyfunc takes {list(MODEL_CONFIG_KEYS)} "
            "(set the batch size per call with params={'batch_size': n})."
        )
    return model_config


def save_model(
    prompt: Any,
    path: str,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | bool | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: dict[str, Any] | str | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
    model_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> None:
    """Save a soft prompt as an MLflow model directory at ``path``.

    Args:
        prompt: a :class:`SoftPrompt`, a prompt directory (ours or PEFT's), or a
            ``peft.PeftModel`` with a prompt-tuning adapter.
        path: where to write the model directory (must not exist or be empty).
        code_paths: files or directories copied into the model's ``code/`` folder, which
            :func:`load_model` and ``mlflow.pyfunc.load_model`` put on ``sys.path``.
        signature: ``None`` (default): ``text`` in; ``label``, ``label_name`` and one
            ``score_<label>`` column per class out; param ``batch_size`` (long, default 32).
            ``False``: no signature. It is never inferred from ``input_example``: that
            would load the base model.
        input_example: stored with the model (not run); defaults to two short texts when
            the prompt knows its task.
        model_config: pyfunc settings, overridable in ``mlflow.pyfunc.load_model(uri,
            model_config=...)``: ``base_model_uri`` (where the pyfunc loads the base
            model; defaults to the prompt's own).
        pip_requirements, extra_pip_requirements, conda_env: as for MLflow's built-in
            flavors. The default requirements are this package (see
            :func:`mlflow_recycle.requirements.package_requirement`) and pinned torch,
            transformers and safetensors.
        metadata, extra_files, mlflow_model: as for MLflow's built-in flavors.
        tokenizer: the base model's tokenizer, as the prompt was tuned with (its ``bos`` applied). Saved
            beside the adapter, it starts each text with that BOS token, as the pyfunc does: PEFT's
            ``AutoPeftModelForCausalLM`` with ``AutoTokenizer`` on ``prompt/`` then scores as the pyfunc.
        kwargs: only what ``Model.log`` passes through (``validate_serving_input``).
    """
    if unexpected := sorted(set(kwargs) - {"validate_serving_input"}):
        raise TypeError(f"save_model() got unexpected keyword argument(s): {', '.join(unexpected)}")
    prompt = as_soft_prompt(prompt)
    config = _check_model_config({"base_model_uri": prompt.base_model_uri, **(model_config or {})})
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    code_dir_subpath = _validate_and_copy_code_paths(code_paths, path)
    mlflow_model = mlflow_model or Model()
    _save_signature_and_example(mlflow_model, prompt, path, signature, input_example)
    if metadata is not None:
        mlflow_model.metadata = metadata
    prompt.save(Path(path) / PROMPT_DATA_DIR)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, prompt, Path(path) / PROMPT_DATA_DIR)
    _add_flavors(mlflow_model, prompt, code_dir_subpath, config, _copy_extra_files(extra_files, path))
    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
    _save_environment(path, conda_env, pip_requirements, extra_pip_requirements)


def _save_tokenizer(tokenizer: Any, prompt: SoftPrompt, directory: Path) -> None:
    """``tokenizer`` in ``directory``, adding the BOS token to each text as the prompted contexts start
    (:class:`~mlflow_recycle.prompted_lm.TaskEncoder`: a causal LM's context starts with its BOS)."""
    fingerprint, files = _tokenizer_files(tokenizer, prompt.task_type == "CAUSAL_LM")
    prompt.check_fits(dim=prompt.dim, fingerprint=fingerprint, model="the tokenizer given")
    for name, content in files.items():
        (directory / name).write_bytes(content)


@functools.lru_cache(maxsize=8)
def _tokenizer_files(tokenizer: Any, add_bos: bool) -> tuple[str, dict[str, bytes]]:
    """``tokenizer``'s fingerprint and its saved files, made once per tokenizer (a migration saves the same
    base's tokenizer beside each of its prompts)."""
    saved = copy.deepcopy(tokenizer)
    if add_bos and saved.bos_token is not None:
        saved.add_bos_token = True
    with tempfile.TemporaryDirectory() as tmp:
        saved.save_pretrained(tmp)
        files = {path.name: path.read_bytes() for path in Path(tmp).iterdir() if path.is_file()}
    return tokenizer_fingerprint(tokenizer), files


def _save_signature_and_example(
    mlflow_model: Model, prompt: SoftPrompt, path: str, signature: Any, input_example: Any
) -> None:
    """Store the input example (two short texts by default, for a prompt with a task) and set the signature."""
    if input_example is None and prompt.task is not None:
        input_example = pd.DataFrame({"text": ["a gripping, beautiful film", "dull and far too long"]})
    _save_example(mlflow_model, input_example, path)
    if signature is None:
        signature = default_signature(prompt)
    if signature is not False:
        mlflow_model.signature = signature


def _add_flavors(
    mlflow_model: Model, prompt: SoftPrompt, code: str | None, config: dict[str, Any], extra_files: dict[str, Any]
) -> None:
    """Add the ``python_function`` and ``soft_prompt`` flavors to ``mlflow_model``."""
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        data=PROMPT_DATA_DIR,
        code=code,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        model_config=config,
    )
    mlflow_model.add_flavor(FLAVOR_NAME, code=code, **flavor_config(prompt), **extra_files)


def _save_environment(
    path: str,
    conda_env: dict[str, Any] | str | None,
    pip_requirements: list[str] | str | None,
    extra_pip_requirements: list[str] | str | None,
) -> None:
    """Write the model's ``conda.yaml``, ``requirements.txt``, ``constraints.txt`` and ``python_env.yaml``."""
    if conda_env is not None:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    else:
        default_reqs = None
        if pip_requirements is None:
            # MLflow pins itself unless it sees a requirement for mlflow, and it takes the wheel's
            # path (".../mlflow_recycle-...") for one: pin it here.
            default_reqs = [_generate_mlflow_version_pinning(), package_requirement(path)]
            default_reqs += get_default_pip_requirements()
        conda_env, pip_requirements, pip_constraints = _processed_requirements(
            *map(_frozen, (default_reqs, pip_requirements, extra_pip_requirements))
        )
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _python_env().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def _frozen(requirements: Any) -> Any:
    """Requirements as a hashable key: a list becomes a tuple, a file path stays."""
    return tuple(requirements) if isinstance(requirements, list | tuple) else requirements


@functools.lru_cache(maxsize=32)
def _processed_requirements(default: Any, pip: Any, extra: Any) -> tuple[dict, list[str], list[str]]:
    """MLflow's processing of the requirements (parsing each one), once per distinct set: a migration writes
    the same ones beside each of its prompts. Read only: callers share the result."""
    return _process_pip_requirements(*(list(r) if isinstance(r, tuple) else r for r in (default, pip, extra)))


@functools.cache
def _python_env() -> _PythonEnv:
    """This interpreter's environment (Python and build tools), read once per process."""
    return _PythonEnv.current()


def log_model(
    prompt: Any,
    artifact_path: str | None = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | bool | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for: int | None = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: dict[str, Any] | str | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
    model_config: dict[str, Any] | None = None,
    prompts: list[Any] | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """Log a soft prompt to the active run (and register it when ``registered_model_name`` is given).

    Parameters are those of ``mlflow.sentence_transformers.log_model`` (less its ``task``
    and ``inference_config``, plus ``model_config``), with the same meanings; see
    :func:`save_model` for the flavor's own. ``artifact_path`` is the deprecated alias of
    ``name``; ``prompts`` are MLflow prompt-registry prompts to link, not soft prompts.
    The input example is stored, not served: MLflow's serving check loads the base model (timed by
    ``bench/log_cost.py``); opt in with ``validate_serving_input=True``, or use ``mlflow.models.predict``.

    To tie the registered version to its base model's registered version, use
    :func:`mlflow_recycle.registry.log_prompt`, which calls this and sets the tags.
    """
    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        prompts=prompts,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        prompt=prompt,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        extra_files=extra_files,
        model_config=model_config,
        tokenizer=tokenizer,
        **{"validate_serving_input": False, **kwargs},
    )


def load_model(model_uri: str, dst_path: str | None = None) -> SoftPrompt:
    """Load a logged soft prompt (``runs:/``, ``models:/``, a local path, ...) as a :class:`SoftPrompt`.

    Code logged with ``code_paths`` goes on ``sys.path`` first, as for MLflow's flavors.
    """
    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    try:
        flavor_conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    except MlflowException as exc:
        raise PromptArtifactError(
            f"{model_uri} is not a soft prompt ({exc.message}); log prompts with mlflow_recycle.soft_prompt.log_model."
        ) from exc
    _add_code_from_conf_to_system_path(local_path, flavor_conf)
    return SoftPrompt.load(Path(local_path) / flavor_conf.get("prompt_data", PROMPT_DATA_DIR))


class SoftPromptPyfunc:
    """pyfunc wrapper: rank-classify texts with the prompt on its base model.

    The base model is loaded on the first :meth:`predict`, from ``base_model_uri`` when
    given (``model_config``), else from the prompt's own. The tokenizer is the one saved beside
    the prompt (``tokenizer_dir``, the BOS token it was tuned with), else the base model's.
    """

    def __init__(self, prompt: SoftPrompt, base_model_uri: str | None = None, tokenizer_dir: str | None = None):
        if prompt.task is None:
            raise PromptArtifactError(
                "This soft prompt has no task (template and verbalizers), so it cannot classify text: "
                "log it with a SoftPrompt whose task is set."
            )
        self.prompt = prompt
        self.base_model_uri = base_model_uri or prompt.base_model_uri
        self.tokenizer_dir = tokenizer_dir

    def get_raw_model(self) -> SoftPrompt:
        return self.prompt

    @functools.cached_property
    def _scorer(self) -> tuple[PromptedLM, TaskEncoder]:
        uri = self.base_model_uri
        if not uri:
            raise PromptArtifactError(
                f"Soft prompt for {self.prompt.describe_base()} records no base_model_uri, so pyfunc cannot load "
                "its base model: re-log it with base_model_uri set (models:/name/version or a local path), or "
                "load it with mlflow.pyfunc.load_model(uri, model_config={'base_model_uri': ...})."
            )
        model, tokenizer = load_base_model(uri)
        if self.tokenizer_dir:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.prompt.check_fits(
            dim=int(model.get_input_embeddings().weight.shape[1]),
            fingerprint=tokenizer_fingerprint(tokenizer),
            model=uri,
        )
        lm = PromptedLM(model)
        return lm, TaskEncoder(tokenizer, self.prompt.task, seq2seq=lm.seq2seq)

    def predict(self, model_input: pd.DataFrame | list[str], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Predicted ``label`` (index), ``label_name`` and each class's log-likelihood ``score_<label>``.

        ``params={"batch_size": n}`` scores ``n`` texts at a time (default 32).
        """
        texts = list(model_input["text"] if isinstance(model_input, pd.DataFrame) else model_input)
        value = (params or {}).get("batch_size")
        batch_size = DEFAULT_BATCH_SIZE if value is None else int(value)
        if batch_size < 1:
            raise RecycleError(f"batch_size must be at least 1, got {value!r}.")
        lm, encoder = self._scorer
        prompt = self.prompt.embeddings.to(next(lm.parameters()).device)
        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = encoder.scoring_batch(encoder.contexts(texts[start : start + batch_size]))
                batch = {k: v.to(prompt.device) for k, v in batch.items()}
                scores.append(lm.class_scores(prompt, batch, self.prompt.task.length_normalize).cpu())
        scores = torch.cat(scores) if scores else torch.empty(0, len(self.prompt.task.labels))
        labels = scores.argmax(1)
        out = pd.DataFrame({"label": labels.numpy(), "label_name": [self.prompt.task.labels[i] for i in labels]})
        for i, name in enumerate(self.prompt.task.labels):
            out[f"score_{name}"] = scores[:, i].double().numpy()
        return out


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> SoftPromptPyfunc:
    """pyfunc loader: ``path`` is the model's ``prompt/`` data directory.

    ``mlflow.pyfunc.load_model`` has put logged code on ``sys.path`` already; a direct call
    does it here.
    """
    root = Path(path).parent
    if (root / MLMODEL_FILE_NAME).is_file():
        conf = _get_flavor_configuration(model_path=str(root), flavor_name=FLAVOR_NAME)
        code = conf.get("code")
        if code and os.path.normpath(root / code) not in map(os.path.normpath, sys.path):
            _add_code_from_conf_to_system_path(str(root), conf)
    config = _check_model_config(dict(model_config or {}))
    saved = Path(path) / "tokenizer_config.json"
    tokenizer_dir = str(path) if saved.is_file() else None  # saved with the prompt (save_model's tokenizer)
    return SoftPromptPyfunc(
        SoftPrompt.load(path), base_model_uri=config.get("base_model_uri"), tokenizer_dir=tokenizer_dir
    )
