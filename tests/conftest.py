"""Shared fixtures: the real model family in ../shared/models and tiny stand-ins.

Real-model fixtures are session-scoped: loading a model costs ~0.1 s but tests touch the
same few models many times. ``MLFLOW_RECYCLE_SHARED`` overrides where ../shared is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # its thread writes os.environ while servers start
# `datasets` caches what it reads; tests write only to temporary directories (and so do their subprocesses).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mlflow-recycle-datasets-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLFLOW_RECYCLE_SHARED", REPO.parent / "shared"))
MODELS = SHARED / "models"
DATA = SHARED / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the checkout (or MLFLOW_RECYCLE_SHARED).")
    return path


@pytest.fixture(scope="session")
def model_dir():
    """``model_dir("small-a")`` -> path of a model of the family."""
    return lambda name: _require(MODELS / name)


@pytest.fixture(scope="session")
def load_model(model_dir):
    """``load_model("small-a")`` -> (model, tokenizer), cached for the session, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict[str, tuple] = {}

    def load(name: str):
        if name not in cache:
            path = model_dir(name)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[name] = (model, AutoTokenizer.from_pretrained(path))
        return cache[name]

    return load


@pytest.fixture(scope="session")
def reexport(model_dir, tmp_path_factory):
    """``reexport("small-a")``: the model with one norm weight nudged by 1e-6, so other weight files
    (registering the same files twice gives one version) in the same embedding space."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"{name}-reexported")
            model = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32)
            with torch.no_grad():
                model.model.norm.weight[0] += 1e-6
            model.save_pretrained(made[name])
            AutoTokenizer.from_pretrained(model_dir(name)).save_pretrained(made[name])
        return made[name]

    return make


@pytest.fixture(scope="session")
def data_dir():
    return lambda task: _require(DATA / task)


@pytest.fixture(autouse=True)
def _no_inherited_experiment(monkeypatch):
    """``mlflow.set_experiment`` exports MLFLOW_EXPERIMENT_ID for child processes; a test that
    called it would otherwise hand its experiment id to the next test's in-process job, which
    takes an id it did not export itself for the caller's choice (``tracking.configure``)."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
