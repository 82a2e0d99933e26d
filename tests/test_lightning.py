"""Prompt tuning and rank classification on a real model, and the data module."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, normalizers
from tokenizers.models import WordPiece
from transformers import PreTrainedTokenizerFast

from lightning_modules import (
    PromptDistillationModule,
    PromptTuningModule,
    RankClassificationModule,
    TextClassificationDataModule,
    UnlabelledPairDataModule,
    adamw,
    read_examples,
)
from mlflow_recycle import RecycleError, TaskSpec
from mlflow_recycle.config import compose, instantiate_partial
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import PromptedLM, TaskEncoder


def trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**options, **kwargs})


def sst2(data_dir, verbalizers=(" bad", " great"), max_length=64, **kwargs) -> TaskSpec:
    return TaskSpec(
        "sst2", "{text} This movie is", verbalizers, data=str(data_dir("sst2")), max_length=max_length, **kwargs
    )


def test_only_the_prompt_changes_during_training(load_model, data_dir, tmp_path):
    model, tokenizer = load_model("small-a")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = TaskEncoder(tokenizer, sst2(data_dir))
    data = TextClassificationDataModule(encoder, batch_size=4, limit_train=16, limit_val=8)
    init = initial_prompt("vocab", model.get_input_embeddings().weight, 5)
    module = PromptTuningModule(model, init, optimizer=adamw(lr=0.05))
    fit = trainer(max_steps=3, limit_val_batches=0)
    fit.fit(module, datamodule=data)
    assert not torch.equal(module.tuned_prompt(), init)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, frozen[name]), f"frozen weight {name} changed"
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["prompt"]
    fit.save_checkpoint(tmp_path / "prompt.ckpt")
    checkpoint = torch.load(tmp_path / "prompt.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == ["prompt"]
    # the settings, as save_hyperparameters records them; no model or tensor among them
    assert checkpoint["hyper_parameters"]["optimizer"].keywords["lr"] == 0.05
    assert not any(isinstance(v, (torch.Tensor, torch.nn.Module)) for v in checkpoint["hyper_parameters"].values())


def test_the_papers_adafactor_and_a_one_cycle_schedule_come_from_the_config(load_model, data_dir):
    model, tokenizer = load_model("small-a")
    encoder = TaskEncoder(tokenizer, sst2(data_dir))
    data = TextClassificationDataModule(encoder, batch_size=4, limit_train=16)
    init = initial_prompt("random", model.get_input_embeddings().weight, 4)
    paper = compose(["prompt=paper"]).prompt
    module = PromptTuningModule(model, init, optimizer=instantiate_partial(paper.optimizer, "prompt.optimizer"))
    trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=data)
    assert not torch.equal(module.tuned_prompt(), init)
    assert type(module.optimizers().optimizer).__name__ == "Adafactor"

    overrides = ["prompt/scheduler=one_cycle", "trainer.max_steps=8", "prompt.scheduler.pct_start=0.5"]
    cfg = compose([*overrides, "prompt.optimizer.lr=0.05"])
    module = PromptTuningModule(
        model,
        init,
        optimizer=instantiate_partial(cfg.prompt.optimizer, "prompt.optimizer"),
        scheduler=instantiate_partial(cfg.prompt.scheduler, "prompt.scheduler"),
    )
    lrs = []

    class Lr(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(max_steps=8, limit_val_batches=0, callbacks=[Lr()]).fit(module, datamodule=data)
    # warm-up from lr/25 to lr over half the steps, then decay: stepped every optimizer step
    assert lrs[0] == pytest.approx(0.05 / 25) and lrs.index(max(lrs)) == 3 and max(lrs) == pytest.approx(0.05)
    assert lrs == sorted(lrs[:4]) + sorted(lrs[4:], reverse=True) and lrs[-1] < 0.05 / 2


def test_an_optimizer_that_cannot_be_built_is_one_error_naming_the_setting(load_model):
    model, _ = load_model("small-a")
    init = initial_prompt("random", model.get_input_embeddings().weight, 4)
    with pytest.raises(RecycleError, match="prompt.optimizer must build a torch optimizer"):
        PromptTuningModule(model, init, optimizer="sgd")
    with pytest.raises(RecycleError, match=r"Cannot build prompt.optimizer \(torch.optim.NoSuch\)"):
        instantiate_partial({"_target_": "torch.optim.NoSuch", "lr": 0.1}, "prompt.optimizer")
    with pytest.raises(RecycleError, match="prompt.optimizer needs a _target_"):
        instantiate_partial({"lr": 0.1}, "prompt.optimizer")


def reference_scores(model, encoder, contexts, prompt, length_normalize):
    """Slow reference: each example and each class on its own, no padding, full logits."""
    out = []
    for context in contexts:
        row = []
        for verbalizer in encoder.verbalizer_ids:
            ids = torch.tensor([context + verbalizer])
            embeds = model.get_input_embeddings()(ids)
            if prompt is not None:
                embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
            log_probs = torch.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)
            start = embeds.shape[1] - len(verbalizer)
            score = sum(float(log_probs[start + j - 1, t]) for j, t in enumerate(verbalizer))
            row.append(score / len(verbalizer) if length_normalize else score)
        out.append(row)
    return torch.tensor(out)


def test_evaluation_batches_pad_contexts_of_like_length(load_model, data_dir):
    """Evaluation reads examples shortest first (scores go back to example order: the reference test below)."""
    _, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, sst2(data_dir)), eval_batch_size=16, limit_test=128)
    batches = list(data.test_dataloader())
    length = {int(i): int(row.sum()) for b in batches for i, row in zip(b["index"], b["attention_mask"], strict=True)}
    assert sorted(length) == list(range(128))  # every example, once
    padded = sum(b["attention_mask"].numel() for b in batches)
    real = sum(length.values())
    shuffled = sum(16 * max(length[j] for j in range(i, i + 16)) for i in range(0, 128, 16))  # batches in example order
    assert padded < 1.15 * real and shuffled > 1.3 * real, (padded, real, shuffled)


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_rank_classification_matches_a_slow_reference(load_model, data_dir, length_normalize, with_prompt):
    model, tokenizer = load_model("small-a")
    # multi-token verbalizers of different lengths, sharing no prefix
    task = sst2(data_dir, verbalizers=(" bad and boring", " really great"), max_length=96)
    encoder = TaskEncoder(tokenizer, task)
    assert [len(v) for v in encoder.verbalizer_ids] == [3, 2]
    data = TextClassificationDataModule(encoder, eval_batch_size=7, limit_test=20)
    prompt = initial_prompt("vocab", model.get_input_embeddings().weight, 6, seed=1) * 2 if with_prompt else None
    module = RankClassificationModule(model, prompt, length_normalize=length_normalize)
    with torch.no_grad():
        trainer().test(module, datamodule=data, verbose=False)
    result = module.results["test"]
    dataset = data.dataset("test")
    with torch.no_grad():
        expected = reference_scores(model, encoder, dataset.contexts, prompt, length_normalize)
    assert torch.allclose(result["scores"], expected, atol=1e-4)
    assert torch.equal(result["predictions"], expected.argmax(1))
    labels = torch.tensor(dataset.labels)
    assert result["accuracy"] == pytest.approx(float((expected.argmax(1) == labels).float().mean()))


def test_classes_sharing_a_prefix_share_one_model_row(load_model, data_dir):
    _, tokenizer = load_model("small-a")
    encoder = TaskEncoder(tokenizer, sst2(data_dir, verbalizers=(" bad", " great", " okay")))
    assert encoder.class_inputs == [()]  # single-token verbalizers: one row scores every class
    batch = encoder.scoring_batch(encoder.contexts(["a b", "c"]))
    assert batch["input_ids"].shape[0] == 2 and batch["row_of_class"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_long_texts_are_truncated_on_the_text_side(load_model, data_dir):
    _, tokenizer = load_model("small-a")
    long_review = " ".join(["word"] * 500) + " THE END"
    for side in ("right", "left"):
        encoder = TaskEncoder(tokenizer, sst2(data_dir, truncation_side=side))
        (context,) = encoder.contexts([long_review])
        assert len(context) + max(map(len, encoder.verbalizer_ids)) <= 64
        assert context[: len(encoder.prefix_ids)] == encoder.prefix_ids
        assert context[-len(encoder.suffix_ids) :] == encoder.suffix_ids  # the cue survives
        body = tokenizer.decode(context[len(encoder.prefix_ids) : -len(encoder.suffix_ids)])
        assert ("THE END" in body) == (side == "left")


def test_verbalizer_that_tokenizes_to_nothing_is_refused(data_dir):
    tokenizer = Tokenizer(WordPiece({"[UNK]": 0, "[PAD]": 1, "good": 2, "bad": 3}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(RecycleError, match=r"verbalizer '\\x00' tokenizes to nothing"):
        TaskEncoder(fast, sst2(data_dir, verbalizers=("\x00", " good")))


def test_tiny_max_length_is_refused(load_model, data_dir):
    _, tokenizer = load_model("small-a")
    with pytest.raises(RecycleError, match="max_length=10 leaves .* raise max_length"):
        TaskEncoder(tokenizer, sst2(data_dir, max_length=10))


def test_data_formats_limits_and_errors(tmp_path, load_model):
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(50)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    (tmp_path / "validation.tsv").write_text(
        "sentence\tlabel\n" + "\n".join(f"{r['text']}\t{r['label']}" for r in rows)
    )
    task = TaskSpec("t", "{text} =", (" a", " b"), data=str(tmp_path), max_length=32)
    assert read_examples(task, "train")[3] == ("review 3", 1)
    assert read_examples(task, "test")[4] == ("review 4", 0)
    assert read_examples(task.replace(text_field="sentence"), "validation")[5] == ("review 5", 1)
    with pytest.raises(RecycleError, match=r"has columns \['sentence', 'label'\]; the task reads 'text'") as error:
        read_examples(task, "validation")
    assert "set task.text_field" in str(error.value) and "task.label_field" in str(error.value)  # settings that exist
    with pytest.raises(RecycleError, match="No 'dev' split"):
        read_examples(task, "dev")

    _, tokenizer = load_model("small-a")
    encoder = TaskEncoder(tokenizer, task)
    subset = TextClassificationDataModule(encoder, limit_train=10, seed=3).examples("train")
    assert len(subset) == 10 and subset == TextClassificationDataModule(encoder, limit_train=10, seed=3).examples(
        "train"
    )
    assert subset != TextClassificationDataModule(encoder, limit_train=10, seed=4).examples("train")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x", "label": 2}))
    with pytest.raises(
        RecycleError, match=r"row 0 \(data rows counted from 0\): label 2 is neither a class index \(0..1\) nor one of"
    ):
        TextClassificationDataModule(encoder).examples("train")


def test_decisions_take_validation_examples_drawn_like_test(tmp_path, load_model):
    """validation_min_words keeps the validation examples long enough to resemble test (SST-2:
    phrases vs sentences); train and test are untouched, and a rule nothing meets is refused."""
    rows = [{"text": " ".join(["word"] * (1 + i % 6)), "label": i % 2} for i in range(60)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _, tokenizer = load_model("small-a")

    def data(min_words, **limits):
        spec = TaskSpec("t", "{text} =", (" a", " b"), data=str(tmp_path), validation_min_words=min_words)
        return TextClassificationDataModule(TaskEncoder(tokenizer, spec), **limits)

    kept = data(4).examples("validation")
    assert len(kept) == 30 and min(len(text.split()) for text, _ in kept) == 4
    assert len(data(4).examples("train")) == len(data(4).examples("test")) == 60
    assert len(data(0).examples("validation")) == 60
    assert len(data(4, limit_val=10).examples("validation")) == 10  # the limit samples among the kept
    with pytest.raises(RecycleError, match="no example has 7 words or more; lower the task's validation_min_words"):
        data(7).examples("validation")
    with pytest.raises(RecycleError, match="validation_min_words must be 0"):
        TaskSpec("t", "{text} =", (" a", " b"), validation_min_words=-1)


def test_train_min_words_filters_what_a_prompt_learns_from(tmp_path, load_model):
    """train_min_words: the train split (labelled, and refinement's unlabelled inputs) keeps the
    examples with that many words; validation and test follow their own rules."""
    from mlflow_recycle.prompt import SoftPrompt
    from mlflow_recycle.refine import unlabelled_texts

    rows = [{"text": " ".join(["word"] * (1 + i % 6)), "label": i % 2} for i in range(60)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _, tokenizer = load_model("small-a")
    spec = TaskSpec("t", "{text} =", (" a", " b"), data=str(tmp_path), train_min_words=5)
    data = TextClassificationDataModule(TaskEncoder(tokenizer, spec))
    assert len(data.examples("train")) == 20 and min(len(t.split()) for t, _ in data.examples("train")) == 5
    assert len(data.examples("validation")) == len(data.examples("test")) == 60
    prompt = SoftPrompt(torch.zeros(2, 4), task=spec)
    texts = unlabelled_texts(prompt, "train", 100, seed=0)
    assert len(texts) == 20 and min(len(t.split()) for t in texts) == 5
    assert len(unlabelled_texts(prompt, "validation", 100, seed=0)) == 60  # another split: no train rule
    with pytest.raises(RecycleError, match="no example has 9 words or more; lower the task's train_min_words"):
        TextClassificationDataModule(TaskEncoder(tokenizer, spec.replace(train_min_words=9))).examples("train")
    with pytest.raises(RecycleError, match="train_min_words must be 0"):
        spec.replace(train_min_words=-1)


def test_fsdp_strategy_wraps_each_transformer_block(load_model):
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_modules.strategies import fsdp_strategy

    model, _ = load_model("small-a")
    strategy = fsdp_strategy(["LlamaDecoderLayer", "GPT2Block"])
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    wrapped = [name for name, module in model.named_modules() if policy(module, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [f"model.layers.{i}" for i in range(6)]


def distillation_data(load_model, data_dir, teacher="small-a", student="small-b", n=48):
    (t_model, t_tok), (s_model, s_tok) = load_model(teacher), load_model(student)
    task = sst2(data_dir)
    texts = [text for text, _ in read_examples(task, "train")[:n]]
    return (
        t_model,
        s_model,
        UnlabelledPairDataModule(texts, TaskEncoder(t_tok, task), TaskEncoder(s_tok, task), batch_size=8),
    )


def test_distillation_agrees_with_itself_and_only_trains_the_student_prompt(load_model, data_dir):
    model, _, data = distillation_data(load_model, data_dir, teacher="small-a", student="small-a")
    prompt = initial_prompt("vocab", model.get_input_embeddings().weight, 6, seed=3) * 2
    module = PromptDistillationModule(model, prompt, model, prompt)
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        loss, agreement = module.distillation_loss(batch)
    assert loss.abs() < 1e-6 and agreement == 1  # same model, same prompt: nothing to learn
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["prompt"]


def test_distillation_moves_the_student_toward_the_teacher(load_model, data_dir):
    teacher, student, data = distillation_data(load_model, data_dir)
    frozen = {k: v.clone() for k, v in student.state_dict().items()}
    table = teacher.get_input_embeddings().weight
    module = PromptDistillationModule(
        teacher,
        initial_prompt("vocab", table, 6, seed=1) * 3,
        student,
        initial_prompt("vocab", table, 6, seed=2),
        optimizer=adamw(lr=0.05),
    )
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = float(module.distillation_loss(batch)[0])
    trainer(max_steps=12, limit_val_batches=0).fit(module, datamodule=data)
    with torch.no_grad():
        after = float(module.distillation_loss(batch)[0])
    assert after < before
    assert all(torch.equal(v, frozen[k]) for k, v in student.state_dict().items())


def test_the_classes_objective_trains_on_the_classes_scores(load_model, data_dir):
    """objective="classes": cross-entropy among the classes' scores, on batches the module asks its
    data module for (one row per example when each verbalizer is one token, as an LM batch)."""
    model, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, sst2(data_dir)), batch_size=8, limit_train=32)
    data.setup("fit")
    lm_batch = next(iter(data.train_dataloader()))
    init = initial_prompt("random", model.get_input_embeddings().weight, 5, seed=0)
    module = PromptTuningModule(model, init, optimizer=adamw(lr=0.05), objective="classes")
    with pytest.raises(RecycleError, match=r"train_batch='classes' \(both follow prompt.objective\)"):
        module.training_step(lm_batch, 0)
    data.train_batch = "classes"
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == lm_batch["input_ids"].shape[0] == 8
    assert batch["labels"].tolist() == [data.dataset("train")[i][2] for i in batch["index"].tolist()]
    with torch.no_grad():
        before = float(module.lm.class_loss(init, batch))
        scores = module.lm.class_scores(init, batch)
    expected = -scores.log_softmax(-1).gather(1, batch["labels"][:, None]).mean()
    assert before == pytest.approx(float(expected), rel=1e-5)
    data.train_batch = "lm"  # the module sets it when fit starts
    trainer(max_steps=8, limit_val_batches=0).fit(module, datamodule=data)
    assert data.train_batch == "classes"
    with torch.no_grad():
        assert float(module.lm.class_loss(module.tuned_prompt(), batch)) < before
    with pytest.raises(RecycleError, match="Unknown tuning objective 'ce': choose one of lm, classes"):
        PromptTuningModule(model, init, objective="ce")
    with pytest.raises(RecycleError, match=r"choose one of lm, classes \(prompt.objective\)"):
        TextClassificationDataModule(TaskEncoder(tokenizer, sst2(data_dir)), train_batch="ce")


def test_regularizer_pulls_the_prompt_toward_its_anchor(load_model, data_dir):
    from mlflow_recycle.prompt_init import regularization_anchor

    model, tokenizer = load_model("small-a")
    table = model.get_input_embeddings().weight
    ids = tokenizer(" great movie", add_special_tokens=False)["input_ids"]
    wayward = regularization_anchor("wayward", table, 5, ids)
    assert torch.equal(wayward[0], table[ids[0]]) and torch.equal(wayward[len(ids)], table[ids[0]])
    assert regularization_anchor("none", table, 5) is None
    with pytest.raises(RecycleError, match="Unknown prompt regularizer 'l1'"):
        regularization_anchor("l1", table, 5)
    data = TextClassificationDataModule(TaskEncoder(tokenizer, sst2(data_dir)), batch_size=4, limit_train=16)
    init = initial_prompt("random", table, 5, seed=0)
    norms = {}
    for gamma in (0.0, 5.0):
        module = PromptTuningModule(model, init, optimizer=adamw(lr=0.05), anchor=torch.zeros_like(init), gamma=gamma)
        trainer(max_steps=4, limit_val_batches=0).fit(module, datamodule=data)
        norms[gamma] = float(module.tuned_prompt().norm(dim=1).mean())
    assert norms[5.0] < norms[0.0]


def test_encoder_decoder_models_take_the_prompt_on_the_encoder(load_model, data_dir):
    """Plumbing on a tiny random T5: batched scores match an unbatched reference, tuning moves only the prompt."""
    from transformers import T5Config, T5ForConditionalGeneration

    _, tokenizer = load_model("small-a")  # any tokenizer: the weights are random
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=1, eos_token_id=0, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    encoder = TaskEncoder(tokenizer, sst2(data_dir, verbalizers=(" bad and boring", " great")), seq2seq=True)
    contexts = encoder.contexts(["a fine film", "the plot is a mess from start to end"])
    prompt = torch.randn(3, 32)
    with torch.no_grad():
        scores = PromptedLM(model).class_scores(prompt, encoder.scoring_batch(contexts))
        for b, context in enumerate(contexts):
            for c, verbalizer in enumerate(encoder.verbalizer_ids):
                embeds = torch.cat([prompt.unsqueeze(0), model.get_input_embeddings()(torch.tensor([context]))], 1)
                logits = model(inputs_embeds=embeds, labels=torch.tensor([verbalizer])).logits[0]
                expected = sum(float(torch.log_softmax(logits[j], -1)[t]) for j, t in enumerate(verbalizer))
                assert abs(float(scores[b, c]) - expected) < 1e-4
    data = TextClassificationDataModule(encoder, batch_size=4, limit_train=8)
    module = PromptTuningModule(model, prompt, optimizer=adamw(lr=0.05))
    trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=data)
    assert not torch.equal(module.tuned_prompt(), prompt)


def test_the_progress_bar_counts_the_step_budget(load_model, data_dir):
    """A prompt trains for max_steps: the bar's total is the steps, not the epoch's batches, and
    it does not read `Epoch 0/-2` (max_epochs is -1)."""
    from lightning_modules.callbacks import StepProgressBar

    model, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, sst2(data_dir)), batch_size=2, limit_train=40)
    seen = {}

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.setdefault("total", bar.total_train_batches)
            seen.setdefault("description", bar._get_train_description(trainer.current_epoch))

    bar = StepProgressBar()
    module = PromptTuningModule(model, initial_prompt("vocab", model.get_input_embeddings().weight, 3))
    L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False, callbacks=[bar, Look()]).fit(
        module, datamodule=data
    )
    assert seen == {"total": 3, "description": "Training: steps 1-3"}  # 20 batches per epoch, 3 steps
