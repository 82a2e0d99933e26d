"""Recycler math on planted problems, persistence, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

from mlflow_recycle import (
    IncompatibleModelError,
    RecycleError,
    SoftPrompt,
    available_recyclers,
    fit_recycler,
    get_recycler,
    load_recycler,
)


def planted(n=1500, d_src=48, d_tgt=40, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, d_src, generator=g)
    weight = torch.randn(d_src, d_tgt, generator=g) / d_src**0.5
    target = source @ weight + noise * torch.randn(n, d_tgt, generator=g)
    return source, target, weight


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_linear_recovers_planted_map():
    source, target, weight = planted()
    recycler = get_recycler("linear").fit(source, target)
    assert rel_err(recycler.weight, weight) < 1e-4
    prompt = torch.randn(20, 48) * 5  # trained prompts sit far from the anchors
    assert rel_err(recycler.transform(prompt), prompt @ weight) < 1e-4


def test_linear_bias_recovers_translation():
    source, target, weight = planted()
    shift = torch.linspace(-1, 1, 40)
    recycler = get_recycler("linear", bias=True).fit(source, target + shift)
    prompt = torch.randn(7, 48)
    assert rel_err(recycler.transform(prompt), prompt @ weight + shift) < 1e-4


def test_ridge_shrinks_the_map():
    source, target, _ = planted(noise=0.5)
    plain = get_recycler("linear").fit(source, target).weight.norm()
    shrunk = get_recycler("linear", ridge=1000.0).fit(source, target).weight.norm()
    assert shrunk < 0.8 * plain


def test_lincomb_equals_linear_on_same_anchors():
    source, target, _ = planted(noise=0.3)  # not exactly linear: the two must still agree
    prompt = torch.randn(20, 48) * 3
    linear = get_recycler("linear").fit(source, target).transform(prompt)
    lincomb = get_recycler("lincomb").fit(source, target)
    assert rel_err(lincomb.transform(prompt), linear) < 1e-5
    assert lincomb.coefficients(prompt.double()).shape == (20, 1500)


def test_procrustes_recovers_planted_rotation_scale_and_shift():
    g = torch.Generator().manual_seed(1)
    source = torch.randn(800, 32, generator=g) + 2.0
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    shift = torch.randn(32, generator=g)
    target = (source - source.mean(0)) @ rotation * 2.5 + shift
    recycler = get_recycler("procrustes").fit(source, target)
    assert rel_err(recycler.rotation, rotation) < 1e-6
    assert abs(float(recycler.factor) - 2.5) < 1e-6
    prompt = torch.randn(5, 32, generator=g) * 4
    expected = (prompt - source.mean(0)) @ rotation * 2.5 + shift
    assert rel_err(recycler.transform(prompt), expected) < 1e-5


def test_procrustes_is_semi_orthogonal_between_dims():
    source, target, _ = planted(d_src=48, d_tgt=40)
    rotation = get_recycler("procrustes").fit(source, target).rotation  # [48, 40]
    assert torch.allclose(rotation.T @ rotation, torch.eye(40, dtype=rotation.dtype), atol=1e-10)


def test_mlp_is_deterministic_with_a_seed_and_lowers_its_loss():
    source, target, _ = planted(n=600, d_src=16, d_tgt=12)
    a = get_recycler("mlp", epochs=8, lr=3e-3, seed=3).fit(source, target)
    b = get_recycler("mlp", epochs=8, lr=3e-3, seed=3).fit(source, target)
    c = get_recycler("mlp", epochs=8, lr=3e-3, seed=4).fit(source, target)
    for name, tensor in a.net.state_dict().items():
        assert torch.equal(tensor, b.net.state_dict()[name])
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    assert a.losses[-1] < 0.5 * a.losses[0]
    assert a.net[0].out_features == 4 * 12  # the paper's 4 x d_tgt hidden layer


def test_identity_keeps_the_prompt_and_needs_equal_dims():
    source, target, _ = planted(d_src=16, d_tgt=16)
    prompt = torch.randn(4, 16)
    assert torch.equal(get_recycler("identity").fit(source, target).transform(prompt), prompt)
    source, target, _ = planted(d_src=16, d_tgt=12)
    with pytest.raises(IncompatibleModelError, match="equal embedding dims, got source 16 and target 12"):
        get_recycler("identity").fit(source, target)


def test_match_norm_carries_relative_norms_across_spaces():
    source, target, _ = planted(d_src=24, d_tgt=24)
    target = target * 3  # target vocabulary is 3x "louder" relative to the map
    recycler = get_recycler("linear", match_norm=True).fit(source, target)
    prompt = torch.randn(6, 24) * torch.arange(1, 7).unsqueeze(1)
    out = recycler.transform(prompt)
    ratio = target.norm(dim=1).mean() / source.norm(dim=1).mean()
    assert torch.allclose(out.norm(dim=1), prompt.norm(dim=1) * ratio, rtol=1e-5)


def test_ridge_auto_picks_no_penalty_for_an_exact_map_and_some_for_a_noisy_one():
    source, target, weight = planted()
    exact = get_recycler("linear", ridge="auto").fit(source, target)
    assert exact.chosen_ridge == 0.0 and rel_err(exact.weight, weight) < 1e-4
    source, target, _ = planted(n=80, d_src=48, noise=3.0)  # few, noisy anchors: shrinkage helps
    assert get_recycler("linear", ridge="auto").fit(source, target).chosen_ridge > 0


def test_relative_recycler_recovers_a_planted_rotation():
    g = torch.Generator().manual_seed(2)
    source = torch.randn(1000, 24, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    recycler = get_recycler("relative", steps=300).fit(source, source @ rotation * 2.0)
    prompt = torch.randn(6, 24, generator=g) * 3  # far outside the anchors' norms
    assert rel_err(recycler.transform(prompt), prompt @ rotation * 2.0) < 1e-2


@pytest.mark.parametrize("name", ["linear", "lincomb", "mlp", "procrustes", "relative", "identity"])
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    source, target, _ = planted(n=300, d_src=16, d_tgt=16)
    options = {"epochs": 2} if name == "mlp" else {"steps": 20} if name == "relative" else {}
    recycler = get_recycler(name, match_norm=True, **options).fit(source, target, source_fingerprint="sha256:a")
    recycler.save(tmp_path / name)
    loaded = load_recycler(tmp_path / name)
    prompt = torch.randn(5, 16)
    assert type(loaded) is type(recycler) and loaded.config == recycler.config
    assert loaded.source_fingerprint == "sha256:a"
    assert torch.equal(loaded.transform(prompt), recycler.transform(prompt))


def test_a_trained_map_transforms_with_its_trained_tensor_and_says_how_it_was_trained(tmp_path):
    """``mapped`` is the transform's math, differentiable in the trainable tensors (what
    MapDistillationModule trains); ``load_trained`` keeps the result, in the config and on disk."""
    source, target, _ = planted(n=300, d_src=16, d_tgt=12)
    recycler = get_recycler("linear", match_norm=True).fit(source, target)
    prompt = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    # float64 math against float32: torch's float32 tolerances (allclose's default atol 1e-8 is float64's)
    torch.testing.assert_close(recycler.mapped(prompt).float(), recycler.transform(prompt.float()))
    weight = recycler.trainable_state()["weight"].clone().requires_grad_(True)
    recycler.mapped(prompt, {"weight": weight}).pow(2).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert recycler.weight is not weight and not recycler.weight.requires_grad  # the fitted tensor is back
    trained = recycler.trainable_state()["weight"] + 0.1
    recycler.load_trained({"weight": trained}, {"steps": 7, "prompts": 2, "task": "sst2"})
    torch.testing.assert_close(recycler.transform(prompt.float()), recycler.mapped(prompt).float())
    assert recycler.config["behaviour"] == {"steps": 7, "prompts": 2, "task": "sst2"}
    loaded = load_recycler(recycler.save(tmp_path / "trained"))
    assert loaded.behaviour == recycler.behaviour and torch.equal(loaded.weight, recycler.weight)
    out = loaded.transform(SoftPrompt(prompt.float()))
    assert out.recycler_config["behaviour"]["prompts"] == 2  # the lineage says the map was trained


def test_a_map_that_is_not_a_tensor_cannot_be_trained():
    source, target, _ = planted(n=300, d_src=16, d_tgt=16)
    with pytest.raises(RecycleError, match="cannot be trained on behaviour.*linear"):
        get_recycler("procrustes").fit(source, target).trainable_state()
    with pytest.raises(RecycleError, match="Fit the 'linear' recycler before"):
        get_recycler("linear").trainable_state()


def test_transforming_a_soft_prompt_records_lineage_and_checks_the_tokenizer():
    source, target, _ = planted(n=300, d_src=16, d_tgt=12)
    recycler = get_recycler("linear", ridge=0.1).fit(
        source, target, source_fingerprint="sha256:src", target_fingerprint="sha256:tgt"
    )
    prompt = SoftPrompt(
        torch.randn(3, 16), base_model="base", base_model_version="1", tokenizer_fingerprint="sha256:src"
    )
    out = recycler.transform(prompt, recycled_from="models:/sentiment/1")
    assert out.dim == 12 and out.tokenizer_fingerprint == "sha256:tgt"
    assert (out.recycled_from, out.recycler, out.recycler_config["ridge"]) == ("models:/sentiment/1", "linear", 0.1)
    assert out.base_model is None and out.base_model_version is None
    foreign = prompt.replace(tokenizer_fingerprint="sha256:other")
    with pytest.raises(IncompatibleModelError, match="tokenizer sha256:other vs sha256:src"):
        recycler.transform(foreign)


# ---------------------------------------------------------------------- bad input
def test_unknown_recycler_lists_the_known_ones():
    with pytest.raises(RecycleError, match="Unknown recycler 'lnear'. Known recyclers: identity, lincomb, linear"):
        get_recycler("lnear")
    assert {"linear", "mlp", "lincomb", "procrustes", "relative", "identity"} <= set(available_recyclers())


def test_bad_recycler_option_names_the_accepted_ones():
    with pytest.raises(RecycleError, match="Bad options for recycler 'linear'.*accepts: ridge, bias, match_norm"):
        get_recycler("linear", lamda=1.0)
    with pytest.raises(RecycleError, match="ridge must be a number >= 0 or 'auto', got 'big'"):
        get_recycler("linear", ridge="big")


def test_wrong_prompt_dim_is_refused():
    source, target, _ = planted()
    recycler = get_recycler("linear").fit(source, target)
    with pytest.raises(IncompatibleModelError, match="prompt has dim 40 but the recycler was fitted for dim 48"):
        recycler.transform(torch.randn(3, 40))


def test_fewer_anchors_than_dimensions_is_refused():
    source, target, _ = planted(n=30)
    with pytest.raises(RecycleError, match="30 anchors are fewer than the source dimension 48"):
        get_recycler("linear").fit(source, target)


def test_nan_and_inf_are_refused():
    source, target, _ = planted()
    bad = source.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(RecycleError, match="source anchor embeddings contains NaN or inf in 1 of 1500 rows"):
        get_recycler("linear").fit(bad, target)
    recycler = get_recycler("linear").fit(source, target)
    prompt = torch.randn(3, 48)
    prompt[1, 1] = float("inf")
    with pytest.raises(RecycleError, match="prompt contains NaN or inf"):
        recycler.transform(prompt)


def test_unpaired_anchors_and_unfitted_use_are_refused():
    source, target, _ = planted()
    with pytest.raises(RecycleError, match="must pair row by row, got 1500 and 1499 rows"):
        get_recycler("linear").fit(source, target[:-1])
    with pytest.raises(RecycleError, match="not fitted"):
        get_recycler("mlp").transform(torch.randn(2, 48))


def test_corrupt_saved_recycler_gives_a_clear_error(tmp_path):
    source, target, _ = planted()
    get_recycler("linear").fit(source, target).save(tmp_path)
    (tmp_path / "recycler.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(RecycleError, match="Cannot read a fitted recycler.*Re-fit the recycler"):
        load_recycler(tmp_path)


# ---------------------------------------------------------------------- real models
def test_fitted_on_real_pair_maps_vocabulary_rows_onto_the_targets_own(load_model):
    source_model, source_tok = load_model("small-a")
    target_model, target_tok = load_model("small-b")
    recycler = fit_recycler("linear", source_model, source_tok, target_model, target_tok)
    prompt = SoftPrompt(
        source_model.get_input_embeddings().weight[1000:1020].detach(),
        tokenizer_fingerprint=recycler.source_fingerprint,
    )
    recycled = recycler.transform(prompt)  # its speed is measured in bench/, never asserted here
    assert recycled.embeddings.shape == (20, 256)
    # The anchors are vocabulary rows, so mapping vocabulary rows must land near the
    # target's own rows for the same tokens, far nearer than a random target row.
    target_rows = target_model.get_input_embeddings().weight[1000:1020].detach()
    near = (recycled.embeddings - target_rows).norm(dim=1).mean()
    far = (recycled.embeddings - target_rows.roll(1, dims=0)).norm(dim=1).mean()
    assert near < 0.8 * far
