"""Anchor vocabularies between real tokenizers: same, BPE vs unigram, BPE vs WordPiece."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from mlflow_recycle import RecycleError, embedding_table, find_anchors
from mlflow_recycle.vocab import surface_form, tokenizer_fingerprint, uses_wordpiece


def build_wordpiece(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("##" + word[-2:], len(vocab))
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def whole_words(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t[1:] for t, _ in sorted(vocab.items(), key=lambda x: x[1]) if t.startswith("Ġ") and t[1:].isalpha()]


def test_same_tokenizer_pairs_identical_ids(load_model):
    _, tok_a = load_model("small-a")
    _, tok_b = load_model("small-b")
    anchors = find_anchors(tok_a, tok_b)
    assert anchors.same_tokenizer and len(anchors) == 4000
    assert torch.equal(anchors.source_ids, anchors.target_ids)
    assert all(t.isalpha() for t in anchors.tokens)
    # offset skips the 1000 most frequent whole words
    assert anchors.tokens[0] == whole_words(tok_a)[1000]


def test_cross_tokenizer_anchors_match_surface_strings(load_model):
    _, tok_a = load_model("small-a")
    _, tok_c = load_model("small-c")
    anchors = find_anchors(tok_a, tok_c, offset=500, size=3000)
    assert not anchors.same_tokenizer and len(anchors) == 3000
    assert not torch.equal(anchors.source_ids, anchors.target_ids)
    source_tokens = tok_a.convert_ids_to_tokens(anchors.source_ids.tolist())
    target_tokens = tok_c.convert_ids_to_tokens(anchors.target_ids.tolist())
    for word, s, t in zip(anchors.tokens, source_tokens, target_tokens, strict=True):
        assert (s, t) == ("Ġ" + word, "▁" + word)


def test_wordpiece_word_starts_are_unmarked(load_model):
    _, tok_a = load_model("small-a")
    wordpiece = build_wordpiece(whole_words(tok_a)[:2500])
    assert uses_wordpiece(wordpiece.get_vocab())
    assert surface_form("##ing", wordpiece=True) == ("ing", False)
    anchors = find_anchors(tok_a, wordpiece, offset=100, size=2000)
    assert len(anchors) == 2000
    target_tokens = wordpiece.convert_ids_to_tokens(anchors.target_ids.tolist())
    assert target_tokens == list(anchors.tokens)  # WordPiece word starts carry no marker


def test_too_little_overlap_is_refused(load_model):
    _, tok_a = load_model("small-a")
    greek = build_wordpiece([f"λόγος{'α' * i}" for i in range(600)])
    with pytest.raises(RecycleError, match="Only 0 anchor tokens.*share too little text"):
        find_anchors(tok_a, greek)


def anchor_settings() -> set[str]:
    """The ``anchors.*`` settings the job and the migration expose."""
    from mlflow_recycle.config import compose

    job, migration = compose(), compose(config_name="migrate")
    return {f"anchors.{key}" for key in job.anchors} & {f"anchors.{key}" for key in migration.anchors}


def test_offset_too_large_suggests_an_offset_that_works(load_model):
    _, tok_a = load_model("small-a")
    with pytest.raises(RecycleError, match=r"Lower anchors.offset to at most (\d+)\.$") as error:
        find_anchors(tok_a, tok_a, offset=5400)
    assert set(re.findall(r"anchors\.\w+", str(error.value))) <= anchor_settings()
    highest = int(re.search(r"at most (\d+)", str(error.value))[1])
    assert len(find_anchors(tok_a, tok_a, offset=highest)) == 500  # following the hint works
    with pytest.raises(RecycleError, match="Lower anchors.offset"):
        find_anchors(tok_a, tok_a, offset=highest + 1)


def test_too_small_size_suggests_raising_it(load_model):
    _, tok_a = load_model("small-a")
    with pytest.raises(RecycleError, match=r"at most size 300\).*Raise anchors.size to at least 500\.$") as error:
        find_anchors(tok_a, tok_a, size=300)
    assert set(re.findall(r"anchors\.\w+", str(error.value))) <= anchor_settings()
    assert len(find_anchors(tok_a, tok_a, size=500)) == 500


def test_embeddings_pair_rows_of_both_tables(load_model):
    model_a, tok_a = load_model("small-a")
    model_l, tok_l = load_model("large")
    anchors = find_anchors(tok_a, tok_l)
    source, target = anchors.embeddings(embedding_table(model_a), embedding_table(model_l))
    assert source.shape == (4000, 256) and target.shape == (4000, 320)
    assert torch.equal(target[0], model_l.get_input_embeddings().weight[anchors.target_ids[0]].float())
    assert tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(tok_l)
    with pytest.raises(RecycleError, match="outside the target embedding table"):
        anchors.embeddings(embedding_table(model_a), embedding_table(model_a)[:100])
