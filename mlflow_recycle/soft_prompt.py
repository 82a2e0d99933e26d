"""The ``soft_prompt`` MLflow flavor: log, register and load soft prompts.

Laid out like MLflow's built-in flavors (``save_model``, ``log_model``, ``load_model``,
``_load_pyfunc``). The model directory holds the prompt in the PEFT prompt-tuning layout
(under ``prompt/``, so the artifact also loads with ``peft.PeftModel.from_pretrained``),
and the MLmodel's ``soft_prompt`` section records the tie to the base model (registered
name, version, URI, tokenizer fingerprint), the shape, the task and the lineage.

As a pyfunc, a soft prompt classifies text with its base model::

    model = mlflow.pyfunc.load_model("models:/sentiment-prompt/3")
    model.predict(pd.DataFrame({"text": ["a gripping, beautiful film"]}))
    #    label label_name  score_bad  score_great
    # 0      1      great     -4.125       -1.879

The base model is loaded from the prompt's ``base_model_uri`` (``models:/name/version`` of
an ``mlflow.transformers`` model, a local directory or a hub id) once per process
(:func:`mlflow_recycle.models.load_base_model`).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types import ColSpec, Schema
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import _get_flavor_configuration, _validate_and_prepare_target_save_path
from mlflow.utils.requirements_utils import _get_pinned_requirement

from .errors import PromptArtifactError, RecycleError
from .models import load_base_model
from .prompt import SoftPrompt
from .prompted_lm import PromptedLM, TaskEncoder
from .vocab import tokenizer_fingerprint

FLAVOR_NAME = "soft_prompt"
PROMPT_DATA_DIR = "prompt"
DEFAULT_BATCH_SIZE = 32

_logger = logging.getLogger(__name__)


def get_default_pip_requirements() -> list[str]:
    """Requirements of a model logged by this flavor (serving needs torch and transformers)."""
    from importlib.metadata import version

    from . import __version__

    # torch's local label (+cpu, +cu126) is not installable from PyPI: pin the release only.
    return [
        f"mlflow-recycle=={__version__}",
        f"torch=={version('torch').split('+')[0]}",
        _get_pinned_requirement("transformers"),
        _get_pinned_requirement("safetensors"),
    ]


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
    labels = prompt.task.labels if prompt.task else ()
    outputs = [ColSpec("long", "label"), ColSpec("string", "label_name")]
    outputs += [ColSpec("double", f"score_{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


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


def save_model(
    prompt: Any,
    path: str,
    conda_env: dict[str, Any] | str | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save a soft prompt as an MLflow model directory at ``path``.

    Args:
        prompt: a :class:`SoftPrompt`, a prompt directory (ours or PEFT's), or a
            ``peft.PeftModel`` with a prompt-tuning adapter.
        path: where to write the model directory (must not exist).
        signature: defaults to ``text`` in; ``label``, ``label_name`` and one
            ``score_<label>`` column per class out.
        input_example: defaults to two short texts when the prompt knows its task.
        conda_env, pip_requirements, extra_pip_requirements, metadata, mlflow_model: as for
            MLflow's built-in flavors.
    """
    prompt = as_soft_prompt(prompt)
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    mlflow_model = mlflow_model or Model()
    if input_example is None and prompt.task is not None:
        input_example = pd.DataFrame({"text": ["a gripping, beautiful film", "dull and far too long"]})
    _save_example(mlflow_model, input_example, path)
    mlflow_model.signature = signature or default_signature(prompt)
    if metadata is not None:
        mlflow_model.metadata = metadata
    prompt.save(Path(path) / PROMPT_DATA_DIR)
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_recycle.soft_prompt",
        data=PROMPT_DATA_DIR,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
    )
    mlflow_model.add_flavor(FLAVOR_NAME, **flavor_config(prompt))
    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def log_model(
    prompt: Any,
    name: str | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    conda_env: dict[str, Any] | str | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    **kwargs: Any,
) -> mlflow.models.model.ModelInfo:
    """Log a soft prompt to the active run (and register it when ``registered_model_name`` is given).

    To tie the registered version to its base model's registered version, use
    :func:`mlflow_recycle.registry.log_prompt`, which calls this and sets the tags.
    """
    import mlflow_recycle.soft_prompt as flavor

    return Model.log(
        artifact_path=None,
        name=name,
        flavor=flavor,
        registered_model_name=registered_model_name,
        prompt=prompt,
        signature=signature,
        input_example=input_example,
        await_registration_for=await_registration_for,
        conda_env=conda_env,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        params=params,
        tags=tags,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None) -> SoftPrompt:
    """Load a logged soft prompt (``runs:/``, ``models:/``, a local path, ...) as a :class:`SoftPrompt`."""
    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    try:
        flavor_conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    except mlflow.exceptions.MlflowException as exc:
        raise PromptArtifactError(
            f"{model_uri} is not a soft prompt ({exc.message}); log prompts with mlflow_recycle.soft_prompt.log_model."
        ) from exc
    return SoftPrompt.load(Path(local_path) / flavor_conf.get("prompt_data", PROMPT_DATA_DIR))


class SoftPromptPyfunc:
    """pyfunc wrapper: rank-classify texts with the prompt on its base model."""

    def __init__(self, prompt: SoftPrompt) -> None:
        if prompt.task is None:
            raise PromptArtifactError(
                "This soft prompt has no task (template and verbalizers), so it cannot classify text: "
                "log it with a SoftPrompt whose task is set."
            )
        self.prompt = prompt

    def get_raw_model(self) -> SoftPrompt:
        return self.prompt

    @functools.cached_property
    def _scorer(self) -> tuple[PromptedLM, TaskEncoder]:
        uri = self.prompt.base_model_uri
        if not uri:
            raise PromptArtifactError(
                f"Soft prompt for {self.prompt.describe_base()} records no base_model_uri, so pyfunc cannot load "
                "its base model: re-log it with base_model_uri set (models:/name/version or a local path)."
            )
        model, tokenizer = load_base_model(uri)
        self.prompt.check_fits(
            dim=int(model.get_input_embeddings().weight.shape[1]),
            fingerprint=tokenizer_fingerprint(tokenizer),
            model=uri,
        )
        lm = PromptedLM(model)
        return lm, TaskEncoder(tokenizer, self.prompt.task, seq2seq=lm.seq2seq)

    def predict(self, model_input: pd.DataFrame | list[str], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Predicted ``label`` (index), ``label_name`` and each class's log-likelihood ``score_<label>``."""
        texts = list(model_input["text"] if isinstance(model_input, pd.DataFrame) else model_input)
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
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
    """pyfunc loader: ``path`` is the model's ``prompt/`` data directory."""
    return SoftPromptPyfunc(SoftPrompt.load(path))
