"""SoftPrompt persistence in the PEFT prompt-tuning layout, and compatibility checks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mlflow_recycle import IncompatibleModelError, PromptArtifactError, RecycleError, SoftPrompt, TaskSpec
from mlflow_recycle.vocab import tokenizer_fingerprint

SST2 = TaskSpec("sst2", "Review: {text}\nSentiment:", (" negative", " positive"), data="/data/sst2")


def full_prompt(dim=256, length=8):
    return SoftPrompt(
        torch.randn(length, dim) * 3,
        base_model="family-llm",
        base_model_uri="models:/family-llm/1",
        base_model_version="1",
        tokenizer_fingerprint="sha256:0123456789abcdef",
        init="class_labels",
        task=SST2,
        recycled_from="models:/sentiment/4",
        recycler="linear",
        recycler_config={"ridge": 0.0, "bias": False, "match_norm": False},
    )


def test_save_load_round_trip_is_bit_exact(tmp_path):
    prompt = full_prompt()
    prompt.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "mlflow_recycle.json",
    ]
    loaded = SoftPrompt.load(tmp_path)
    assert torch.equal(loaded.embeddings, prompt.embeddings)
    assert loaded.metadata() == prompt.metadata()
    assert loaded.task == SST2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", 8, 256)


def test_exported_prompt_loads_in_peft_and_changes_the_output(tmp_path, load_model, model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, tokenizer = load_model("small-a")
    model = AutoModelForCausalLM.from_pretrained(model_dir("small-a"), dtype=torch.float32).eval()
    rows = model.get_input_embeddings().weight[500:510].detach() * 4
    SoftPrompt(rows, base_model_uri=str(model_dir("small-a"))).save(tmp_path)
    ids = tokenizer("a wonderful film", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0, -1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prompted_model = peft.PeftModel.from_pretrained(model, tmp_path)
        assert torch.equal(prompted_model.prompt_encoder["default"].embedding.weight, rows)
        prompted = prompted_model(input_ids=ids).logits[0, -1]
    assert prompted.shape == plain.shape
    assert (prompted - plain).abs().max() > 0.1


def test_peft_trained_prompt_directory_imports(tmp_path, load_model):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, _ = load_model("small-a")
    fresh = AutoModelForCausalLM.from_config(model.config)  # keep the shared fixture unwrapped
    peft_model = peft.get_peft_model(fresh, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    peft_model.save_pretrained(tmp_path)
    weights = peft_model.prompt_encoder["default"].embedding.weight.detach()
    prompt = SoftPrompt.load(tmp_path)
    assert torch.equal(prompt.embeddings, weights)
    assert (prompt.length, prompt.dim, prompt.task_type, prompt.init) == (6, 256, "CAUSAL_LM", "random")


def test_check_fits_names_both_sides(load_model):
    model, tokenizer = load_model("small-a")
    other_model, other_tokenizer = load_model("small-c")
    prompt = full_prompt(dim=256).replace(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    prompt.check_fits_model(model, tokenizer)
    with pytest.raises(
        IncompatibleModelError, match=r"'family-llm' v1 does not fit small-c: tokenizer sha256:\w+ vs sha256:\w+"
    ):
        prompt.check_fits_model(other_model, other_tokenizer, name="small-c")
    with pytest.raises(IncompatibleModelError, match="embedding dim 320 vs 256"):
        full_prompt(dim=320).check_fits_model(model, name="small-a")


# ---------------------------------------------------------------------- bad input
def test_missing_weights_file(tmp_path):
    full_prompt().save(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(PromptArtifactError, match="Missing adapter_model.safetensors.*Re-download or re-log"):
        SoftPrompt.load(tmp_path)


def test_corrupt_weights_file(tmp_path):
    full_prompt().save(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(PromptArtifactError, match="corrupt or truncated"):
        SoftPrompt.load(tmp_path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(PromptArtifactError, match="No soft prompt directory"):
        SoftPrompt.load(tmp_path / "nowhere")
    with pytest.raises(PromptArtifactError, match="Missing adapter_config.json"):
        SoftPrompt.load(tmp_path)


def test_inconsistent_files_are_refused(tmp_path):
    full_prompt().save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 9
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        PromptArtifactError, match=r"has shape \(8, 256\) but adapter_config.json says num_virtual_tokens=9"
    ):
        SoftPrompt.load(tmp_path)
    config["peft_type"] = "LORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PromptArtifactError, match="'LORA' adapter, not PROMPT_TUNING"):
        SoftPrompt.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PromptArtifactError, match="not valid JSON"):
        SoftPrompt.load(tmp_path)


def test_bad_tensors_are_refused():
    with pytest.raises(RecycleError, match=r"non-empty \[length, dim\] matrix, got shape \(256,\)"):
        SoftPrompt(torch.zeros(256))
    with pytest.raises(RecycleError, match="NaN or inf"):
        SoftPrompt(torch.full((2, 4), float("nan")))
    with pytest.raises(RecycleError, match="floating point"):
        SoftPrompt(torch.zeros(2, 4, dtype=torch.long))


def test_task_spec_validation():
    with pytest.raises(RecycleError, match=r"has no '\{text\}' placeholder"):
        TaskSpec("t", "Review: \nSentiment:", (" a", " b"))
    with pytest.raises(RecycleError, match="empty one"):
        TaskSpec("t", "{text} =", (" a", "  "))
    with pytest.raises(RecycleError, match="at least two verbalizers"):
        TaskSpec("t", "{text} =", (" a",))
    assert TaskSpec.from_dict(SST2.to_dict()) == SST2
