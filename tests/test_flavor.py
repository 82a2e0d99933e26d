"""The soft_prompt flavor and registry ties, on a real SQLite tracking store and real models."""

from __future__ import annotations

import warnings

import lightning as L
import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lightning_modules import RankClassificationModule, TextClassificationDataModule
from mlflow_recycle import IncompatibleModelError, PromptArtifactError, RecycleError, SoftPrompt, TaskSpec, soft_prompt
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import TaskEncoder
from mlflow_recycle.registry import (
    TAG_BASE_MODEL,
    TAG_BASE_VERSION,
    base_of,
    check_prompt_fits_base,
    ensure_base_model,
    log_prompt,
    prompts_for,
    register_base_model,
    tie,
)
from mlflow_recycle.vocab import tokenizer_fingerprint


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite-backed tracking store and registry, with small-a as base model version 1."""
    root = tmp_path_factory.mktemp("store")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment("flavor-tests")
    yield root
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def base(store, model_dir):
    return register_base_model(str(model_dir("small-a")), "imdb-lm")


@pytest.fixture(scope="module")
def task(data_dir):
    return TaskSpec("sst2", "{text} This movie is", (" bad", " great"), data=str(data_dir("sst2")), max_length=96)


@pytest.fixture(scope="module")
def prompt(base, task, load_model):
    model, _ = load_model("small-a")
    rows = initial_prompt("vocab", model.get_input_embeddings().weight, 8, seed=5) * 3
    return tie(
        SoftPrompt(rows, tokenizer_fingerprint=base.tags["mlflow_recycle.tokenizer_fingerprint"], task=task), base
    )


@pytest.fixture(scope="module")
def registered(prompt):
    with mlflow.start_run():
        return log_prompt(prompt, "prompt", "sst2-prompt")


def test_base_model_version_records_what_prompts_need(base, load_model, model_dir):
    model, tokenizer = load_model("small-a")
    assert base.version in (1, "1")
    assert base.tags["mlflow_recycle.tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert base.tags["mlflow_recycle.embedding_dim"] == "256"
    # the same weights are found, not registered twice
    assert ensure_base_model(str(model_dir("small-a")), "imdb-lm").version == base.version


def test_registered_prompt_is_tied_and_found(registered, prompt):
    assert registered.tags[TAG_BASE_MODEL] == "imdb-lm" and registered.tags[TAG_BASE_VERSION] == "1"
    assert [(v.name, str(v.version)) for v in prompts_for("imdb-lm", 1)] == [("sst2-prompt", str(registered.version))]
    assert prompts_for("imdb-lm", 2) == []
    assert base_of(f"models:/sst2-prompt/{registered.version}") == ("imdb-lm", "1")
    MlflowClient().set_registered_model_alias("sst2-prompt", "champion", registered.version)
    assert base_of("models:/sst2-prompt@champion") == ("imdb-lm", "1")
    run = MlflowClient().get_run(registered.run_id)
    assert run.data.tags["mlflow_recycle.prompt.base_model_version"] == "1"  # the run records the tie too


def test_load_is_bit_exact_and_mlmodel_records_the_tie(registered, prompt):
    uri = f"models:/sst2-prompt/{registered.version}"
    loaded = soft_prompt.load_model(uri)
    assert torch.equal(loaded.embeddings, prompt.embeddings) and loaded.metadata() == prompt.metadata()
    section = mlflow.models.get_model_info(uri).flavors["soft_prompt"]
    assert (section["base_model"], section["base_model_version"], section["length"], section["dim"]) == (
        "imdb-lm",
        "1",
        8,
        256,
    )
    assert section["verbalizers"] == [" bad", " great"]


def test_pyfunc_predicts_what_lightning_evaluation_predicts(registered, prompt, load_model):
    model, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, prompt.task), limit_test=48, eval_batch_size=16)
    module = RankClassificationModule(model, prompt.embeddings)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(module, datamodule=data, verbose=False)
    texts = [text for text, _ in data.examples("test")]
    pyfunc = mlflow.pyfunc.load_model(f"models:/sst2-prompt/{registered.version}")
    out = pyfunc.predict(pd.DataFrame({"text": texts}), params={"batch_size": 5})
    assert list(out.columns) == ["label", "label_name", "score_bad", "score_great"]
    assert out["label"].tolist() == module.results["test"]["predictions"].tolist()
    assert 0 < out["label"].sum() < len(texts)  # a real mix of labels, not a constant
    assert torch.allclose(
        torch.tensor(out[["score_bad", "score_great"]].values).float(), module.results["test"]["scores"], atol=1e-4
    )
    assert set(out["label_name"]) <= {"bad", "great"}


def test_logged_artifact_loads_in_peft(registered, load_model, model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    local = mlflow.artifacts.download_artifacts(f"models:/sst2-prompt/{registered.version}", dst_path=str(tmp_path))
    base_model = AutoModelForCausalLM.from_pretrained(model_dir("small-a"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(base_model, f"{local}/prompt")
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, soft_prompt.load_model(local).embeddings)


def test_peft_trained_prompt_logs_through_the_flavor(store, model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(model_dir("small-a"), dtype=torch.float32)
    peft_model = peft.get_peft_model(base_model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with mlflow.start_run():
        info = soft_prompt.log_model(peft_model, name="peft_prompt")
    loaded = soft_prompt.load_model(info.model_uri)
    assert torch.equal(loaded.embeddings, peft_model.prompt_encoder["default"].embedding.weight.detach())
    assert loaded.base_model_uri == str(model_dir("small-a"))
    with pytest.raises(RecycleError, match="Cannot log a dict as a soft prompt"):
        soft_prompt.save_model({"not": "a prompt"}, str(store / "bad"))


def test_mismatched_base_model_is_refused(prompt, base, model_dir, load_model, store):
    _, small_c_tokenizer = load_model("small-c")
    foreign = prompt.replace(base_model_uri=str(model_dir("small-c")))  # same dim, other tokenizer
    with pytest.raises(IncompatibleModelError, match=r"'imdb-lm' v1 does not fit .*small-c: tokenizer sha256:\w+ vs"):
        soft_prompt.SoftPromptPyfunc(foreign).predict(["a fine film"])
    wide = SoftPrompt(
        torch.randn(4, 320), base_model="imdb-lm-large", tokenizer_fingerprint=prompt.tokenizer_fingerprint
    )
    with pytest.raises(
        IncompatibleModelError, match=r"'imdb-lm-large' does not fit 'imdb-lm' v1: embedding dim 320 vs 256"
    ):
        check_prompt_fits_base(wide, base)


def test_missing_or_corrupt_weights_give_a_clear_error(registered, tmp_path):
    local = mlflow.artifacts.download_artifacts(f"models:/sst2-prompt/{registered.version}", dst_path=str(tmp_path))
    weights = tmp_path / "prompt" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 12)
    with pytest.raises(PromptArtifactError, match="corrupt or truncated.*Re-download or re-log"):
        soft_prompt.load_model(local)
    with pytest.raises(PromptArtifactError, match="corrupt or truncated"):
        mlflow.pyfunc.load_model(local)
    weights.unlink()
    with pytest.raises(PromptArtifactError, match="Missing adapter_model.safetensors"):
        soft_prompt.load_model(local)


def test_a_model_of_another_flavor_is_not_a_prompt(base):
    with pytest.raises(PromptArtifactError, match="is not a soft prompt"):
        soft_prompt.load_model(f"models:/imdb-lm/{base.version}")
    with pytest.raises(RecycleError, match="not a registered model URI"):
        base_of("runs:/abc/prompt")
