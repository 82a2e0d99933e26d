"""The soft_prompt flavor and registry ties, on a real SQLite tracking store and real models."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import mlflow
import mlflow.sentence_transformers
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from packaging.version import Version

from lightning_modules import RankClassificationModule, TextClassificationDataModule
from mlflow_recycle import IncompatibleModelError, PromptArtifactError, RecycleError, SoftPrompt, TaskSpec, soft_prompt
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import TaskEncoder
from mlflow_recycle.registry import (
    TAG_BASE_MODEL,
    TAG_BASE_VERSION,
    TAG_DIGEST,
    base_of,
    base_versions,
    check_prompt_fits_base,
    log_prompt,
    prompts_for,
    register_base_model,
    tie,
    weights_digest,
)
from mlflow_recycle.requirements import _installed_from_index
from mlflow_recycle.vocab import tokenizer_fingerprint
from tests.servers import seeded_store

TEXTS = ["a gripping, beautiful film", "dull and far too long", "a fine cast", "i wanted my money back"] * 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite-backed tracking store and registry, with small-a as base model version 1."""
    root = tmp_path_factory.mktemp("store")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(seeded_store(root))
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
    assert str(base.version) == "1"
    assert base.tags["mlflow_recycle.tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert base.tags["mlflow_recycle.embedding_dim"] == "256"
    assert base.tags[TAG_DIGEST] == weights_digest(str(model_dir("small-a")))
    # the same weights are found, not registered twice
    assert register_base_model(str(model_dir("small-a")), "imdb-lm").version == base.version
    assert [str(v.version) for v in base_versions("imdb-lm")] == ["1"]


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


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of texts in each batch the pyfunc scores (a spy on the real TaskEncoder.scoring_batch)."""
    sizes: list[int] = []
    scoring_batch = TaskEncoder.scoring_batch

    def spy(self, contexts):
        sizes.append(len(contexts))
        return scoring_batch(self, contexts)

    monkeypatch.setattr(TaskEncoder, "scoring_batch", spy)
    return sizes


def test_pyfunc_predicts_what_lightning_evaluation_predicts(registered, prompt, load_model, batch_sizes):
    model, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, prompt.task), limit_test=48, eval_batch_size=16)
    module = RankClassificationModule(model, prompt.embeddings)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(module, datamodule=data, verbose=False)
    texts = [text for text, _ in data.examples("test")]
    pyfunc = mlflow.pyfunc.load_model(f"models:/sst2-prompt/{registered.version}")
    batch_sizes.clear()
    out = pyfunc.predict(pd.DataFrame({"text": texts}), params={"batch_size": 5})
    assert batch_sizes == [5] * 9 + [3]  # the param reached predict
    assert list(out.columns) == ["label", "label_name", "score_bad", "score_great"]
    assert out["label"].tolist() == module.results["test"]["predictions"].tolist()
    assert 0 < out["label"].sum() < len(texts)  # a real mix of labels, not a constant
    assert torch.allclose(
        torch.tensor(out[["score_bad", "score_great"]].values).float(), module.results["test"]["scores"], atol=1e-4
    )
    assert out["label_name"].tolist() == [("bad", "great")[label] for label in out["label"]]


def test_batch_size_is_a_declared_param(registered, batch_sizes):
    pyfunc = mlflow.pyfunc.load_model(f"models:/sst2-prompt/{registered.version}")
    assert pyfunc.metadata.get_params_schema() == ParamSchema([ParamSpec("batch_size", "long", 32)])
    frame = pd.DataFrame({"text": TEXTS})
    by_five = pyfunc.predict(frame, params={"batch_size": 5})
    assert batch_sizes == [5, 5, 2]
    batch_sizes.clear()
    default = pyfunc.predict(frame)
    assert batch_sizes == [12]  # the signature's default, 32
    pd.testing.assert_frame_equal(by_five, default, atol=1e-4)
    with pytest.raises(RecycleError, match="batch_size must be at least 1, got 0"):
        pyfunc.predict(frame, params={"batch_size": 0})


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


# ---------------------------------------------------------------------- parity with MLflow's flavors
def test_parameters_match_mlflow_builtin_flavors():
    """Everything mlflow.sentence_transformers takes, by the same names; only its model-specific ones differ."""

    def names(function, drop):
        return [name for name in inspect.signature(function).parameters if name not in drop]

    builtin_only, ours_only = {"model", "task", "inference_config"}, {"prompt", "model_config", "tokenizer"}
    assert names(soft_prompt.log_model, ours_only) == names(mlflow.sentence_transformers.log_model, builtin_only)
    assert names(soft_prompt.save_model, ours_only) == names(mlflow.sentence_transformers.save_model, builtin_only)
    assert inspect.signature(soft_prompt.log_model).parameters["artifact_path"].default is None


def test_code_paths_are_saved_and_put_on_sys_path(prompt, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "soft_prompt_test_code", raising=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "soft_prompt_test_code.py").write_text("VALUE = 7\n")
    path = tmp_path / "model"
    soft_prompt.save_model(prompt, str(path), code_paths=[str(tmp_path / "src" / "soft_prompt_test_code.py")])
    code = str(path / "code")
    assert (path / "code" / "soft_prompt_test_code.py").is_file()
    flavors = Model.load(str(path)).flavors
    assert flavors["soft_prompt"]["code"] == flavors["python_function"]["code"] == "code"
    assert code not in sys.path
    soft_prompt.load_model(str(path))
    assert sys.path[0] == code and importlib.import_module("soft_prompt_test_code").VALUE == 7

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != code])
    mlflow.pyfunc.load_model(str(path))
    assert sys.path.count(code) == 1  # pyfunc.load_model adds it; _load_pyfunc does not add it again
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != code])
    soft_prompt._load_pyfunc(str(path / "prompt"))  # a direct call adds it itself
    assert sys.path.count(code) == 1


def test_artifact_path_is_the_deprecated_alias_of_name(prompt, store):
    with mlflow.start_run():
        info = soft_prompt.log_model(prompt, artifact_path="legacy")
        assert info.name == "legacy"
        assert torch.equal(soft_prompt.load_model(info.model_uri).embeddings, prompt.embeddings)
        with pytest.raises(MlflowException, match="Both `artifact_path` .* and `name`"):
            soft_prompt.log_model(prompt, artifact_path="a", name="b")


def test_signature_defaults_can_be_replaced_or_turned_off(prompt, tmp_path):
    soft_prompt.save_model(prompt, str(tmp_path / "default"))
    default = Model.load(str(tmp_path / "default"))
    assert default.signature.inputs == Schema([ColSpec("string", "text")])
    assert default.signature.outputs.input_names() == ["label", "label_name", "score_bad", "score_great"]
    assert default.signature.params == ParamSchema([ParamSpec("batch_size", "long", 32)])

    soft_prompt.save_model(prompt, str(tmp_path / "none"), signature=False)
    none = Model.load(str(tmp_path / "none"))
    assert none.signature is None
    assert none.saved_input_example_info["artifact_path"] == "input_example.json"  # the example is still stored

    mine = ModelSignature(inputs=Schema([ColSpec("string", "text")]))
    soft_prompt.save_model(prompt, str(tmp_path / "mine"), signature=mine)
    assert Model.load(str(tmp_path / "mine")).signature == mine


def test_logging_never_loads_the_base_model(prompt, tmp_path, monkeypatch, caplog):
    loads: list[str] = []

    def refuse(uri):
        loads.append(uri)
        raise RecycleError(f"(test) would load {uri}")

    monkeypatch.setattr(soft_prompt, "load_base_model", refuse)
    unloadable = prompt.replace(base_model_uri=str(tmp_path / "no-such-model"))
    with caplog.at_level(logging.WARNING), mlflow.start_run():
        info = soft_prompt.log_model(unloadable, name="unloadable")
        version = log_prompt(unloadable, "unloadable_tied", "unloadable-prompt")
    assert loads == []
    assert "serving input" not in caplog.text  # MLflow's serving check did not run (and fail) either
    for uri in (info.model_uri, f"models:/unloadable-prompt/{version.version}"):
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / uri.replace("/", "_"))))
        assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    # The spy does see a load: the first prediction is where the base model is loaded.
    with pytest.raises(RecycleError, match=r"\(test\) would load .*no-such-model"):
        mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"text": ["a fine film"]}))
    assert loads == [str(tmp_path / "no-such-model")]


def test_model_config_overrides_where_the_base_model_is_loaded(prompt, model_dir, tmp_path):
    unloadable = prompt.replace(base_model_uri=str(tmp_path / "no-such-model"))
    soft_prompt.save_model(unloadable, str(tmp_path / "model"))
    frame = pd.DataFrame({"text": TEXTS})
    with pytest.raises(RecycleError, match="Cannot load a model from .*no-such-model"):
        mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(frame)
    local_base = str(model_dir("small-a"))
    moved = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"base_model_uri": local_base})
    expected = soft_prompt.SoftPromptPyfunc(prompt.replace(base_model_uri=local_base)).predict(frame)
    pd.testing.assert_frame_equal(moved.predict(frame), expected)
    with pytest.raises(RecycleError, match=r"Unknown soft_prompt model_config key\(s\) \['device'\]"):
        soft_prompt.save_model(prompt, str(tmp_path / "bad"), model_config={"device": "cuda"})


def requirements(path: Path) -> list[str]:
    return (path / "requirements.txt").read_text().splitlines()


def test_default_requirements_install_in_a_fresh_environment(prompt, tmp_path):
    soft_prompt.save_model(prompt, str(tmp_path / "model"))
    lines = requirements(tmp_path / "model")
    wheels = [line for line in lines if line.startswith("wheels/")]
    pins = {Requirement(line).name: str(Requirement(line).specifier) for line in lines if line not in wheels}
    assert pins == {
        "mlflow": f"=={mlflow.__version__}",
        "torch": f"=={Version(torch.__version__).public}",  # no local label (+cpu): PyPI serves none
        "transformers": f"=={importlib.metadata.version('transformers')}",
        "safetensors": f"=={importlib.metadata.version('safetensors')}",
    }
    # This package is not on PyPI: the model carries a wheel of it, which pip installs from the model directory.
    assert wheels == [f"wheels/mlflow_recycle-{mlflow_recycle_version()}-py3-none-any.whl"]
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site)]
    subprocess.run([*install, wheels[0]], cwd=tmp_path / "model", check=True)
    check = "import mlflow_recycle.soft_prompt as s, importlib.metadata as m; "
    check += "print(s.__file__, m.version('mlflow-recycle'))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split() == [str(site / "mlflow_recycle" / "soft_prompt.py"), mlflow_recycle_version()], out.stderr


def mlflow_recycle_version() -> str:
    from mlflow_recycle import __version__

    return __version__


def test_requirement_arguments_behave_as_in_mlflow(prompt, tmp_path):
    soft_prompt.save_model(prompt, str(tmp_path / "own"), pip_requirements=["torch==2.13.0"])
    assert requirements(tmp_path / "own") == [f"mlflow=={mlflow.__version__}", "torch==2.13.0"]
    assert not (tmp_path / "own" / "wheels").exists()
    soft_prompt.save_model(prompt, str(tmp_path / "default"))
    soft_prompt.save_model(prompt, str(tmp_path / "extra"), extra_pip_requirements=["scikit-learn>=1"])
    assert requirements(tmp_path / "extra") == [*requirements(tmp_path / "default"), "scikit-learn>=1"]
    with pytest.raises(ValueError, match="Only one of `conda_env`, `pip_requirements`, and `extra_pip_requirements`"):
        soft_prompt.save_model(prompt, str(tmp_path / "both"), conda_env={}, pip_requirements=["torch"])
    with pytest.raises(TypeError, match="unexpected keyword argument.*signiture"):
        soft_prompt.save_model(prompt, str(tmp_path / "typo"), signiture=False)


def test_a_source_tree_on_the_path_is_not_an_index_install(tmp_path):
    """An installer's record without direct_url.json means "from an index" only when it holds the running code."""
    info = tmp_path / "mlflow_recycle-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflow-recycle\nVersion: 9.9\n")
    (info / "INSTALLER").write_text("pip\n")
    assert not _installed_from_index(importlib.metadata.PathDistribution(info))
    assert not _installed_from_index(None)


def test_log_model_records_metadata_params_tags_and_registers(prompt, store, tmp_path):
    extra = tmp_path / "notes.txt"
    extra.write_text("tuned on sst2\n")
    with mlflow.start_run():
        info = soft_prompt.log_model(
            prompt,
            name="full",
            registered_model_name="full-prompt",
            await_registration_for=0,
            metadata={"owner": "tests"},
            params={"lr": 0.3},
            tags={"team": "nlp"},
            extra_files=[str(extra)],
        )
    assert info.registered_model_version == 1 and info.metadata == {"owner": "tests"}
    logged = MlflowClient().get_logged_model(info.model_id)
    assert logged.params["lr"] == "0.3" and logged.tags["team"] == "nlp"
    assert MlflowClient().get_model_version("full-prompt", "1").source == f"models:/{info.model_id}"
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    assert (local / "extra_files" / "notes.txt").read_text() == "tuned on sst2\n"
    assert info.flavors["soft_prompt"]["extra_files"] == [{"path": "extra_files/notes.txt"}]
