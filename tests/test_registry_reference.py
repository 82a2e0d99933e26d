"""Base models registered by reference (no copy of the weights), on a real SQLite store."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from mlflow_recycle import RecycleError
from mlflow_recycle.models import (
    CACHE_ENV,
    GGUF_MARKER,
    REFERENCE_FILE,
    REFERENCE_FLAVOR,
    convert_gguf,
    load_base_model,
)
from mlflow_recycle.registry import TAG_DIGEST, register_base_model, weights_digest
from tests.servers import seeded_store
from tests.test_real_models import write_llama_gguf


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(seeded_store(root))
    mlflow.set_experiment(experiment_id=MlflowClient().create_experiment("ref", artifact_location=str(root / "art")))
    yield root
    mlflow.set_tracking_uri(previous)
    load_base_model.cache_clear()


def artifact_bytes(uri: str, dst: Path) -> int:
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def test_reference_registration_stores_no_weights_and_refuses_changed_ones(store, model_dir, load_model, tmp_path):
    copy = tmp_path / "small-a"
    shutil.copytree(model_dir("small-a"), copy)
    version = register_base_model(str(copy), "lm-ref", copy_weights=False, bos="<pad>")
    uri = f"models:/lm-ref/{version.version}"
    assert version.tags[TAG_DIGEST] == weights_digest(str(copy)) == weights_digest(str(model_dir("small-a")))
    size = artifact_bytes(uri, tmp_path / "dl")
    assert size < 1_000_000 < (copy / "model.safetensors").stat().st_size  # small-a's weights: 12.5 MB
    assert REFERENCE_FLAVOR in mlflow.models.Model.load(uri).flavors
    assert (tmp_path / "dl" / REFERENCE_FILE).is_file()
    # Registering the same weights again finds this version, wherever they lie.
    assert register_base_model(str(model_dir("small-a")), "lm-ref").version == version.version

    model, tokenizer = load_base_model(uri)
    reference, _ = load_model("small-a")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert tokenizer.bos_token == "<pad>"  # the bos it was registered with

    weights = load_file(str(copy / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    load_base_model.cache_clear()
    with pytest.raises(RecycleError, match=r"weights in .* changed since models:/lm-ref/1 was registered.*new version"):
        load_base_model(uri)
    shutil.rmtree(copy)
    with pytest.raises(RecycleError, match=r"registered by reference to .* not a directory.*copy_weights=True"):
        load_base_model(uri)


def test_local_directories_are_still_copied_by_default(store, model_dir, tmp_path):
    version = register_base_model(str(model_dir("small-a-early")), "lm-copy", bos=False)
    uri = f"models:/lm-copy/{version.version}"
    assert "transformers" in mlflow.models.Model.load(uri).flavors
    assert artifact_bytes(uri, tmp_path / "dl") > (model_dir("small-a-early") / "model.safetensors").stat().st_size
    assert load_base_model(uri)[1].bos_token is None  # the copied tokenizer keeps the bos setting


def test_the_same_model_uri_in_another_store_is_another_model(model_dir, tmp_path):
    """``models:/lm/1`` names a model of one registry: a process that works with two stores (a
    migration after another, a test suite) gets each store's own."""
    previous = mlflow.get_tracking_uri()
    try:
        loaded = {}
        for name in ("small-a", "small-b"):
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/{name}.db")
            mlflow.set_experiment(name)  # not the experiment a module fixture made active in its own store
            register_base_model(str(model_dir(name)), "lm", copy_weights=False)
            loaded[name] = load_base_model("models:/lm/1")[0]
        first, second = (model.get_input_embeddings().weight for model in loaded.values())
        assert not torch.equal(first, second)
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_gguf_files_conversion_is_referenced_by_default_and_made_again_where_it_is_missing(
    store, model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_llama_gguf(model_dir("small-a"), tmp_path / "small-a.gguf")
    converted = convert_gguf(tmp_path, "small-a.gguf")
    version = register_base_model(str(converted), "lm-gguf")  # no copy_weights: the default for a GGUF file
    uri = f"models:/lm-gguf/{version.version}"
    assert REFERENCE_FLAVOR in mlflow.models.Model.load(uri).flavors
    assert artifact_bytes(uri, tmp_path / "dl") < 1_000_000
    before = load_base_model(uri)[0].get_input_embeddings().weight.clone()
    shutil.rmtree(converted)  # another machine: the GGUF file is there, its conversion is not
    load_base_model.cache_clear()
    again = load_base_model(uri)[0].get_input_embeddings().weight
    assert (converted / GGUF_MARKER).is_file() and torch.equal(before, again)  # converted again, the same weights
