"""The migration policy on real models: each stage's stop rule, skips and their reasons, the
gate's threshold, the best-validation prompt, and the data a gate may look at."""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules import (
    BestPrompt,
    ProgressLog,
    PromptTuningModule,
    TextClassificationDataModule,
    adamw,
    fit_prompt,
    read_examples,
)
from mlflow_recycle import RecycleError, SoftPrompt, TaskSpec
from mlflow_recycle.evaluation import Baselines, ClassReport, Evaluator
from mlflow_recycle.models import LoadedModel
from mlflow_recycle.policy import (
    DEGRADED,
    FAILED,
    PASSED,
    SKIPPED,
    UNEVALUATED,
    Gate,
    Policy,
    RecyclerChoice,
    Transfer,
    run_policy,
)
from mlflow_recycle.policy.stages import like_validation
from mlflow_recycle.prompt_init import initial_prompt
from mlflow_recycle.prompted_lm import TaskEncoder
from mlflow_recycle.recycle import fit_recycler
from mlflow_recycle.recyclers import get_recycler

PROMPT = Path(__file__).parent / "assets" / "sst2-prompt-small-a"

trainer = partial(
    L.Trainer, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0
)


@pytest.fixture(scope="module")
def sides(load_model, model_dir):
    def side(name: str) -> LoadedModel:
        model, tokenizer = load_model(name)
        return LoadedModel(name, str(model_dir(name)), model, tokenizer)

    return side


@pytest.fixture
def good_prompt(data_dir):
    """A prompt tuned on small-a (tests/assets, 300 steps): above small-a's zero-shot on SST-2."""
    prompt = SoftPrompt.load(PROMPT)
    return prompt.replace(task=prompt.task.replace(data=str(data_dir("sst2"))))


def recording(made: list) -> callable:
    """A map store that keeps nothing and notes each map made: ``fit linear``, the behaviour of a trained one."""

    def store(key, label, make):
        recycler, _ = make()
        made.append(label.split(" map on")[0] if recycler.behaviour is None else recycler.behaviour["prompts"])
        return recycler

    return store


def transfer(sides, source: str, target: str, fits: list | None = None, **kwargs) -> Transfer:
    store = recording(fits) if fits is not None else None
    return Transfer(sides(source), sides(target), trainer, **{"limit_val": 48, "random_draws": 1, "store": store,
                                                              **kwargs})  # fmt: skip


def policy(*stages: tuple[str, dict], margin: float = 0.0, **gate) -> Policy:
    return Policy.from_config({"gate": {"margin": margin, **gate}, "stages": dict(stages)})


RECYCLE = ("recycle", {"recyclers": [{"name": "identity", "when": "same_space"}, {"name": "linear"}]})
REFINE = ("refine", {"steps": 4, "eval_every": 2, "texts": 64, "batch_size": 8})
RETUNE = ("retune", {"steps": 4, "eval_every": 2, "batch_size": 8, "limit_train": 64})


def stage(named: tuple[str, dict], **settings) -> tuple[str, dict]:
    """``named`` with ``settings`` over its own."""
    return named[0], {**named[1], **settings}


def recycling(*recyclers: dict) -> tuple[str, dict]:
    return "recycle", {"recyclers": list(recyclers)}


# ---------------------------------------------------------------------- the gate
def test_the_gate_sets_a_floor_and_a_share_of_the_source_gain_to_keep():
    baselines = Baselines({"validation": 0.70}, {"validation": 0.60}, {"validation": 0.02})
    assert Gate().bar(baselines).threshold == pytest.approx(0.70)
    assert Gate(margin=2).bar(baselines).threshold == pytest.approx(0.72)
    # keep half of a 20-point source gain: 0.70 + 0.10, above the margin's 0.72
    bar = Gate(margin=2, keep_gain=0.5).bar(baselines, source_gain=0.20)
    assert (bar.floor, bar.keep, bar.threshold) == pytest.approx((0.72, 0.80, 0.80))
    assert bar.gain_kept(0.78) == pytest.approx(0.40)  # (0.78 - 0.70) / 0.20
    assert Gate(keep_gain=0.5).bar(baselines, source_gain=-0.1).threshold == pytest.approx(0.70)  # nothing to keep
    with pytest.raises(RecycleError, match="policy.gate.split may be"):
        Gate(split="train")
    with pytest.raises(RecycleError, match="policy.gate.keep_gain is a share between 0 and 1"):
        Gate(keep_gain=5)


def test_the_verdict_is_passed_degraded_or_failed_and_decided_in_one_place():
    """Over the bar: passed. Over the floor, under the share to keep: degraded (it works, worse than
    it did). At or under the floor: failed. ``passes`` is strict."""
    gate = Gate(keep_gain=0.9)
    bar = gate.bar(Baselines({"validation": 0.70}, {"validation": 0.60}, {"validation": 0.0}), source_gain=0.10)
    assert bar.threshold == pytest.approx(0.79)
    verdicts = [gate.verdict(score, bar) for score in (0.80, 0.785, 0.75, 0.70, None)]
    assert verdicts == [PASSED, DEGRADED, DEGRADED, FAILED, FAILED]
    assert gate.passes(0.7901, bar) and not gate.passes(bar.threshold, bar)
    # re-tuned until validation stopped improving: as good as the new base gets from there, so over the floor passes
    at_plateau = [gate.verdict(score, bar, plateaued=True) for score in (0.80, 0.785, 0.75, 0.70, None)]
    assert at_plateau == [PASSED, PASSED, PASSED, FAILED, FAILED]


def test_gate_margin_in_standard_errors_of_the_baseline():
    """margin_se: the baseline's own noise on the gate split, sqrt(p(1 - p) / n), so a draw of a
    few lucky examples does not pass; a smaller split asks for more."""
    on = {"validation": 0.70}, {"validation": 0.60}, {"validation": 0.02}
    large, small = Baselines(*on, examples={"validation": 2100}), Baselines(*on, examples={"validation": 84})
    assert Gate(margin_se=2).bar(large).threshold == pytest.approx(0.70 + 2 * 0.01)  # sqrt(.21 / 2100) = 0.01
    assert Gate(margin_se=2).bar(small).threshold == pytest.approx(0.70 + 2 * 0.05)
    assert Gate(margin=1, margin_se=2).bar(large).threshold == pytest.approx(0.73)  # points and errors add up
    assert Gate().bar(Baselines(*on)).threshold == pytest.approx(0.70)  # no count needed without margin_se
    gate = Gate(margin=1, margin_se=2)
    assert gate.describe(gate.bar(large), large) == (
        "accuracy > 0.7300 (best baseline 0.7000 + 1 points + 2 x 0.0100 SE, n=2100)"
    )
    with pytest.raises(RecycleError, match="No example count recorded for the 'validation' baselines"):
        Gate(margin_se=1).bar(Baselines(*on))
    with pytest.raises(RecycleError, match="policy.gate.margin_se is a number of standard errors"):
        Gate(margin_se=-1)


def test_a_macro_f1_standard_error_is_a_macro_f1s_not_a_binomial_one():
    """A 4-class prompt that never predicts one class: its macro-F1's bootstrap spread, measured from
    the confusion counts, is not sqrt(p(1 - p) / n) of the macro-F1 read as an accuracy."""
    confusion = ((30, 5, 5, 0), (5, 30, 5, 0), (5, 5, 30, 0), (10, 10, 20, 0))
    report = ClassReport(0.6, ("a", "b", "c", "d"), confusion)
    se = report.standard_error("macro_f1")
    binomial = (report.macro_f1() * (1 - report.macro_f1()) / report.examples) ** 0.5
    assert 0.01 < se < 0.1 and abs(se - binomial) > 0.1 * binomial, (se, binomial)
    assert report.standard_error("macro_f1") == se  # seeded: the same bar every time
    assert report.standard_error("accuracy") == pytest.approx((0.6 * 0.4 / 160) ** 0.5)
    errors = Baselines({"validation": 0.5}, {"validation": 0.4}, {"validation": 0.0}, {"validation": 160},
                       errors={"validation": se})  # fmt: skip
    assert Gate(margin_se=1, metric="macro_f1").bar(errors).floor == pytest.approx(0.5 + se)


def test_a_macro_f1_gate_decides_and_stops_in_macro_f1(sides, good_prompt, load_model, data_dir):
    """gate.metric=macro_f1: baselines, threshold, score and the stages' early stops all in macro-F1,
    the metric that sees a prompt favouring one class (accuracy can hide it)."""
    with pytest.raises(RecycleError, match="gate.metric may be accuracy or macro_f1"):
        Gate(metric="f1")
    pair = transfer(sides, "small-a", "small-b")
    outcome = run_policy(policy(RECYCLE, REFINE, margin=-100, metric="macro_f1"), pair, good_prompt)
    data = pair.data(pair.target, good_prompt)
    report = pair.evaluator("validation").report(pair.target, data, outcome.prompt.embeddings, "check")["validation"]
    assert outcome.score == pytest.approx(report.macro_f1()) and outcome.score != pytest.approx(report.accuracy)
    zero_shot = pair.evaluator("validation").report(pair.target, data, None, "zero")["validation"]
    assert outcome.baselines.zero_shot["validation"] == pytest.approx(zero_shot.macro_f1())
    assert "policy/recycle/gate_macro_f1" in outcome.metrics()  # records name the metric they hold
    # an early stop watches the module's logged macro-F1, the same number ClassReport computes
    module, data = tuning_module(load_model, data_dir)
    fit = fit_prompt(module, trainer, steps=2, eval_every=2, metric="macro_f1", datamodule=data)
    again = Evaluator(trainer, ("validation",)).report(LoadedModel("small-a", "", module.lm.model, None), data,
                                                       fit.prompt, "again")["validation"]  # fmt: skip
    assert fit.score == pytest.approx(again.macro_f1())


def test_bad_policies_are_refused_with_the_setting_to_change():
    with pytest.raises(RecycleError, match="A policy has a recycle stage: set policy.stages.recycle.recyclers"):
        policy(REFINE)
    with pytest.raises(RecycleError, match=r"Unknown policy stage\(s\) \['finetune'\]: policy.stages may name"):
        policy(RECYCLE, ("finetune", {}))
    with pytest.raises(RecycleError, match=r"Unknown setting\(s\) \['epochs'\] in policy.stages.retune; it takes"):
        policy(RECYCLE, ("retune", {"epochs": 3}))
    with pytest.raises(RecycleError, match="Unknown when='always' for recycler 'identity'"):
        policy(recycling({"name": "identity", "when": "always"}))
    with pytest.raises(RecycleError, match=r"Bad policy.stages.refine.patience=0: set a positive whole number"):
        policy(RECYCLE, stage(REFINE, patience=0))
    with pytest.raises(RecycleError, match=r"Bad policy.stages.retune.eval_every=-25"):
        policy(RECYCLE, REFINE, ("retune", {"eval_every": -25}))
    with pytest.raises(RecycleError, match=r"Bad policy.stages.retune.objective='ce'; choose one of lm, classes"):
        policy(RECYCLE, stage(RETUNE, objective="ce"))
    with pytest.raises(RecycleError, match=r"Bad policy.stages.retune.until='best'; choose one of bar, plateau"):
        policy(RECYCLE, stage(RETUNE, until="best"))
    with pytest.raises(RecycleError, match=r"until=plateau needs policy.stages.retune.patience"):
        policy(RECYCLE, stage(RETUNE, until="plateau"))
    with pytest.raises(RecycleError, match=r"Unknown setting\(s\) \['start'\] in policy.stages.retune"):
        policy(RECYCLE, stage(RETUNE, start="best_or_init"))  # an option the benchmark rejected, removed
    with pytest.raises(RecycleError, match=r"Unknown setting\(s\) \['screen'\] in policy.gate"):
        policy(RECYCLE, screen=64)
    with pytest.raises(RecycleError, match=r"'procrustes' recycler's map cannot be trained.*linear_behaviour"):
        policy(recycling({"name": "procrustes", "train_map": {"steps": 10}}))
    with pytest.raises(RecycleError, match="Bad refine settings"):
        policy(recycling({"name": "linear", "train_map": {"epochs": 10}}))
    with pytest.raises(RecycleError, match="policy.stages maps stage names to settings"):
        Policy.from_config({"stages": [{"stage": "recycle"}]})
    assert policy(RECYCLE, stage(REFINE, patience=None)).stage("refine").patience is None
    assert policy(RECYCLE, stage(RETUNE, objective="lm")).stage("retune").objective == "lm"
    assert policy(RECYCLE).stage("retune") is None


def test_the_stages_train_on_what_the_validation_rule_keeps():
    """Refining and re-tuning train on the examples the gate's validation rule keeps (the task's
    validation_min_words as its train_min_words: SST-2's phrases of 12+ words read like its test)."""
    prompt = SoftPrompt(torch.zeros(2, 4), task=TaskSpec("t", "{text}", (" a", " b"), validation_min_words=12))
    assert like_validation(prompt).task.train_min_words == 12
    assert like_validation(SoftPrompt(torch.zeros(2, 4))).task is None


# ---------------------------------------------------------------------- stop rules
def tuning_module(load_model, data_dir, lr=0.05):
    model, tokenizer = load_model("small-a")
    prompt = SoftPrompt.load(PROMPT)
    encoder = TaskEncoder(tokenizer, prompt.task.replace(data=str(data_dir("sst2"))))
    data = TextClassificationDataModule(encoder, batch_size=8, limit_train=96, limit_val=32)
    init = initial_prompt("vocab", model.get_input_embeddings().weight, 8, seed=0)
    return PromptTuningModule(model, init, optimizer=adamw(lr), name="t"), data


def test_fit_stops_at_the_first_validation_above_the_gate(load_model, data_dir):
    module, data = tuning_module(load_model, data_dir)
    passed = fit_prompt(module, trainer, steps=12, eval_every=3, stop_above_score=-1.0, datamodule=data)
    assert (passed.steps, passed.stopped_early, passed.best_step) == (3, True, 3)
    module, data = tuning_module(load_model, data_dir)
    never = fit_prompt(module, trainer, steps=6, eval_every=3, stop_above_score=2.0, datamodule=data)
    assert (never.steps, never.stopped_early) == (6, False)


def test_patience_stops_a_fit_that_does_not_improve_on_its_start(load_model, data_dir):
    """patience=2 counted from an unbeatable start_score: two validations, then stop, not the budget.
    Without a start the first validation sets the bar, so the same patience needs at least three."""
    module, data = tuning_module(load_model, data_dir)
    flat = fit_prompt(module, trainer, steps=30, eval_every=3, patience=2, start_score=2.0, datamodule=data)
    assert (flat.steps, flat.plateaued, flat.stopped_early) == (6, True, False)
    module, data = tuning_module(load_model, data_dir)
    unanchored = fit_prompt(module, trainer, steps=12, eval_every=3, patience=2, datamodule=data)
    assert unanchored.steps >= 9


def test_the_best_validation_prompt_is_kept_not_the_last(load_model, data_dir):
    """A run whose last validation is worse than an earlier one returns the earlier prompt."""
    module, data = tuning_module(load_model, data_dir, lr=0.5)  # a large lr: validation goes up and down

    class Record(L.Callback):
        seen: list = []

        def on_validation_end(self, trainer, pl_module):
            self.seen.append((float(trainer.callback_metrics["t/validation_accuracy"]), pl_module.tuned_prompt()))

    record = Record()
    outcome = fit_prompt(module, trainer, steps=16, eval_every=2, datamodule=data, callbacks=[record])
    scores = [score for score, _ in record.seen]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert scores[-1] < scores[best], f"the run must end below its best to test this: {scores}"
    assert outcome.score == scores[best] and outcome.best_step == 2 * (best + 1)
    assert torch.equal(outcome.prompt, record.seen[best][1])
    assert not torch.equal(outcome.prompt, module.tuned_prompt())


def test_training_written_to_a_file_logs_its_progress(load_model, data_dir, caplog):
    module, data = tuning_module(load_model, data_dir)
    with caplog.at_level("INFO", logger="lightning_modules.callbacks"):
        fit_prompt(module, trainer, steps=3, datamodule=data, callbacks=[ProgressLog(every_seconds=0)])
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_modules.callbacks"]
    assert lines[0].startswith("t: step 1 of 3 (t/train_loss ") and lines[-1].startswith("t: step 3 of 3")


def test_best_prompt_callback_refuses_a_bad_mode():
    with pytest.raises(ValueError, match="mode must be"):
        BestPrompt("x", mode="up")


# ---------------------------------------------------------------------- stages
def test_recycle_stops_at_the_first_recycler_that_passes(sides, good_prompt, caplog):
    fits: list[str] = []
    with caplog.at_level("INFO", logger="mlflow_recycle.policy.stages"):
        outcome = run_policy(policy(RECYCLE, REFINE, RETUNE), transfer(sides, "small-a", "small-a", fits), good_prompt)
    said = f"Recycled by identity: accuracy {outcome.score:.4f} on the gate's draw, over the bar"
    assert said in [record.getMessage() for record in caplog.records]  # the log says what each map scored
    assert (outcome.gate, outcome.stage) == (PASSED, "recycle")
    assert fits == ["fit identity"] and list(outcome.records[0].tried) == ["identity"]  # linear never fitted
    assert len(outcome.records) == 1 and outcome.steps == 0  # no training once the gate passed
    assert outcome.score > outcome.threshold == outcome.baselines.best("validation")
    assert outcome.baselines.examples == {"validation": 48}  # the gate split's draw (limit_val)


def test_baselines_are_those_of_the_draw_a_prompt_is_judged_on(sides, good_prompt):
    """A transfer reseeded between prompts (the policy benchmark runs each prompt's seed) draws another
    validation subset: its baselines are measured on that draw, not reused from the first one."""
    pair = transfer(sides, "small-a", "small-b")
    first = pair.baselines(pair.target, good_prompt, "validation", pair.data(pair.target, good_prompt))
    pair.seed = 1
    data = pair.data(pair.target, good_prompt)
    second = pair.baselines(pair.target, good_prompt, "validation", data)
    zero_shot = pair.evaluator("validation").score(pair.target, data, None, "zero_shot")["validation"]
    assert second.zero_shot["validation"] == pytest.approx(zero_shot) != first.zero_shot["validation"]
    assert pair.baselines(pair.target, good_prompt, "validation", pair.data(pair.target, good_prompt)) is second


def test_a_source_score_the_job_measured_while_tuning_is_not_measured_again_on_the_same_draw(sides, good_prompt):
    """The gate's share of the source's gain reads the source prompt's score; the job tells the transfer the
    score its tuning kept the prompt by, which counts only on the same draw of examples."""
    pair = transfer(sides, "small-a", "small-b")
    source = pair.source
    data = pair.data(source, good_prompt)
    pair.known(source, good_prompt, "validation", data, "accuracy", 0.987)
    gate = Gate(keep_gain=0.9)
    judge = pair.judge(gate, good_prompt, None)
    assert judge.source_score == 0.987  # told, not measured: the bar keeps 0.9 of that gain
    assert judge.bar.source_gain == pytest.approx(0.987 - judge.transfer.baselines(
        source, good_prompt, "validation", data).best("validation"))  # fmt: skip
    pair.seed = 1  # another draw: measured there
    measured = pair.judge(gate, good_prompt, None).source_score
    other = pair.evaluator("validation").score(source, pair.data(source, good_prompt), good_prompt.embeddings, "x")
    assert measured == pytest.approx(other["validation"]) != 0.987


def test_a_margin_in_standard_errors_raises_the_bar_the_stages_see(sides, good_prompt):
    """The same prompt under a gate that asks for 3 standard errors more: the threshold moves by
    them, and a prompt that passed at recycle by less goes on to the next stage."""
    pair = transfer(sides, "small-a", "small-a")
    lenient = run_policy(policy(RECYCLE, REFINE), pair, good_prompt)
    baselines = lenient.baselines
    margin = lenient.score - lenient.threshold
    strict_se = margin / baselines.standard_error("validation") + 1  # just out of reach
    strict = run_policy(policy(RECYCLE, REFINE, margin_se=strict_se), pair, good_prompt)
    assert strict.threshold == pytest.approx(lenient.threshold + strict_se * baselines.standard_error("validation"))
    assert strict.records[0].status == FAILED and strict.records[1].stage == "refine"


def test_identity_is_only_tried_when_the_embedding_space_is_kept(sides, good_prompt):
    fits: list[str] = []
    outcome = run_policy(policy(RECYCLE, margin=-100), transfer(sides, "small-a", "small-b", fits), good_prompt)
    assert fits == ["fit linear"] and outcome.records[0].method == "linear"
    assert outcome.prompt.recycler == "linear" and outcome.prompt.base_model == "small-b"


def test_a_prompt_failing_every_stage_is_returned_with_the_reason(sides, good_prompt):
    outcome = run_policy(
        policy(RECYCLE, REFINE, RETUNE, margin=100), transfer(sides, "small-a", "small-b"), good_prompt
    )
    assert outcome.gate == FAILED and outcome.stage is None
    assert [(r.stage, r.status, r.steps) for r in outcome.records] == [
        ("recycle", FAILED, 0),
        ("refine", FAILED, 4),  # the whole budget: the gate never passed
        ("retune", FAILED, 4),
    ]
    assert "does not beat" in outcome.reason and outcome.prompt.cost["steps"] == 8
    metrics = outcome.metrics()
    assert metrics["policy/steps"] == 8 and metrics["policy/refine/steps"] == 4
    assert metrics["policy/seconds"] == pytest.approx(sum(r.seconds for r in outcome.records))
    # compute, counted: the recycle stage's gate evaluations; refining (4 training steps of 8 texts and their teacher's
    # passes) and re-tuning (4 of 8 examples), their validations too
    recycle, refine, retune = (r.flops for r in outcome.records)
    assert 0 < recycle < refine and 0 < retune < refine
    assert metrics["policy/flops"] == outcome.prompt.cost["flops"] == recycle + refine + retune


def test_without_labelled_train_data_refine_and_retune_are_skipped_with_reasons(sides, good_prompt, tmp_path):
    data = tmp_path / "sst2-eval-only"  # validation and test, no train split
    data.mkdir()
    for split in ("validation", "test"):
        shutil.copy(good_prompt.task.data + f"/{split}.jsonl", data)
    prompt = good_prompt.replace(task=good_prompt.task.replace(data=str(data)))
    outcome = run_policy(policy(RECYCLE, REFINE, RETUNE, margin=100), transfer(sides, "small-a", "small-b"), prompt)
    assert [(r.stage, r.status) for r in outcome.records] == [
        ("recycle", FAILED),
        ("refine", SKIPPED),
        ("retune", SKIPPED),
    ]
    assert (
        "no unlabelled inputs" in outcome.records[1].reason and "no usable 'train' split" in outcome.records[1].reason
    )
    assert "no labelled training data" in outcome.records[2].reason
    assert "retune: no labelled training data" in outcome.reason
    assert [r.flops > 0 for r in outcome.records] == [True, False, False]  # a skipped stage computes nothing


def test_a_stage_the_policy_turns_off_is_skipped_and_says_so(sides, good_prompt):
    outcome = run_policy(
        policy(RECYCLE, stage(REFINE, skip=True), stage(RETUNE, skip=True), margin=100),
        transfer(sides, "small-a", "small-b"),
        good_prompt,
    )
    assert [(r.stage, r.status, r.steps, r.flops) for r in outcome.records[1:]] == [
        ("refine", SKIPPED, 0, 0.0),
        ("retune", SKIPPED, 0, 0.0),
    ]
    assert [r.reason for r in outcome.records[1:]] == [
        "the policy skips it (policy.stages.refine.skip)",
        "the policy skips it (policy.stages.retune.skip)",
    ]
    assert outcome.gate == FAILED and "policy.stages.retune.skip" in outcome.reason
    assert policy(RECYCLE, stage(REFINE, skip=True), RETUNE).label == "identity/linear > retune(4)"  # what runs


def test_refinement_that_does_not_beat_its_start_stops_with_its_reason(sides, good_prompt):
    """patience=1 and a learning rate of 0: the student never improves on the recycled prompt it
    starts from, so refinement stops at its first validation and the record says why."""
    pair = transfer(sides, "small-a", "small-b", limit_val=200)
    frozen = stage(REFINE, steps=8, lr=0.0, patience=1)
    outcome = run_policy(policy(RECYCLE, frozen, margin=100), pair, good_prompt)
    refine = outcome.records[1]
    assert (refine.stage, refine.status, refine.steps) == ("refine", FAILED, 2)
    assert (
        refine.reason == "stopped after 2 of 8 steps: 1 checks in a row did not improve (policy.stages.refine.patience)"
    )
    assert refine.score == outcome.records[0].score


def test_keep_gain_asks_for_a_share_of_the_source_prompts_own_gain(sides, good_prompt):
    """gate.keep_gain=0.5: the bar is at least the target's best baseline plus half of what the prompt
    gains over the source's own best baseline, both measured on the gate split's draw."""
    pair = transfer(sides, "small-a", "small-b", limit_val=200)
    outcome = run_policy(policy(RECYCLE, keep_gain=0.5), pair, good_prompt)
    source_data = pair.data(pair.source, good_prompt)
    teacher = pair.evaluator("validation").score(pair.source, source_data, good_prompt.embeddings, "t")["validation"]
    gain = teacher - pair.baselines(pair.source, good_prompt, "validation", source_data).best("validation")
    assert outcome.source_score == pytest.approx(teacher) and gain > 0.05  # a gain worth keeping half of
    target_best = outcome.baselines.best("validation")
    assert outcome.threshold == pytest.approx(target_best + 0.5 * gain)  # above the margin-free bar: gain > 0


def test_without_task_data_the_prompt_is_recycled_unevaluated(sides, good_prompt):
    prompt = good_prompt.replace(task=good_prompt.task.replace(data="/nonexistent/sst2"))
    outcome = run_policy(policy(RECYCLE, REFINE, RETUNE), transfer(sides, "small-a", "small-b"), prompt)
    assert outcome.gate == UNEVALUATED and outcome.threshold is None
    assert [(r.stage, r.status) for r in outcome.records] == [("recycle", UNEVALUATED)]
    assert "not reachable" in outcome.reason


def test_refinement_and_re_tuning_carry_a_failing_recycled_prompt_over_the_gate(sides, good_prompt):
    """small-a -> small-b (another seed): the linear map loses the task; the policy brings it back."""
    refine = stage(REFINE, steps=60, eval_every=10, texts=960)
    faster = {"_target_": "torch.optim.AdamW", "lr": 0.03}
    retune = stage(RETUNE, steps=60, eval_every=10, limit_train=960, optimizer=faster)
    outcome = run_policy(policy(RECYCLE, refine, retune), transfer(sides, "small-a", "small-b"), good_prompt)
    statuses = [(r.stage, r.status) for r in outcome.records]
    assert statuses[0] == ("recycle", FAILED), statuses
    assert outcome.gate == PASSED and outcome.stage in ("refine", "retune"), outcome.summary()
    passing = outcome.records[-1]
    assert passing.status == PASSED and passing.steps < 60 and passing.steps % 10 == 0  # stopped at the gate
    assert outcome.score > outcome.threshold


def test_re_tuning_until_a_plateau_goes_on_past_the_bar_and_keeps_its_best(sides, good_prompt):
    """The same re-tuning (same seed) with ``until: bar`` stops at the first check over the bar; with
    ``until: plateau`` it goes on from there while validation improves, so it ends later and no worse."""
    recipe = {"_target_": "torch.optim.AdamW", "lr": 0.3}
    at_bar = stage(RETUNE, steps=60, eval_every=5, limit_train=480, patience=8, optimizer=recipe)
    low = {"margin": -3.0}  # 3 points under the best baseline: within reach of a few steps, not of the map alone
    first = run_policy(policy(RECYCLE, at_bar, **low), transfer(sides, "small-a", "small-b"), good_prompt)
    plateau_policy = policy(RECYCLE, stage(at_bar, until="plateau"), **low)
    on = run_policy(plateau_policy, transfer(sides, "small-a", "small-b"), good_prompt)
    stopped, plateau = first.records[-1], on.records[-1]
    assert (stopped.stage, stopped.status) == ("retune", PASSED) and stopped.steps < 60, first.summary()
    assert (plateau.stage, plateau.status, on.gate) == ("retune", PASSED, PASSED), on.summary()
    assert plateau.steps > stopped.steps and on.score >= first.score
    assert plateau.steps == 60 or plateau.reason.startswith(f"stopped after {plateau.steps} of 60 steps: 8 checks")


def test_a_prompt_re_tuned_to_a_plateau_under_the_share_to_keep_passes_and_says_so(sides, good_prompt):
    """Keeping all of the source's gain is out of reach on small-b; the floor, 10 points under its best
    baseline, is not. Stopped on a plateau, the prompt is as good as re-tuning gets from its start: passed,
    where stopping at the bar calls the same prompt degraded."""
    retune = stage(RETUNE, steps=40, eval_every=5, limit_train=160, patience=2)
    gate = {"margin": -10.0, "keep_gain": 1.0}
    outcomes = {until: run_policy(policy(RECYCLE, stage(retune, until=until), **gate),
                                  transfer(sides, "small-a", "small-b"), good_prompt)
                for until in ("bar", "plateau")}  # fmt: skip
    at_bar, on = outcomes["bar"], outcomes["plateau"]
    assert on.records[-1].reason.startswith("stopped after") and on.score <= on.threshold, on.summary()
    assert (at_bar.gate, at_bar.at_plateau) == (DEGRADED, False), at_bar.summary()
    assert (on.gate, on.stage, on.at_plateau) == (PASSED, "retune", True), on.summary()
    assert on.summary().startswith("gate passed at a plateau")
    assert "as good as the new base gets from its start" in on.description("source", None)


def test_checks_dearer_than_their_share_of_training_are_spaced_out_with_the_same_patience_in_checks():
    """A check is a forward pass per validation example, a step a forward and backward pass over a batch:
    500 examples cost 31 steps of batch 8 (SmolLM2's recipe) but 8 of batch 32 (our models')."""
    from mlflow_recycle.policy.config import RetuneStage

    ours = RetuneStage(eval_every=25, patience=4, batch_size=32, check_share=0.4)
    assert ours.paced(500) is ours  # 8 of 25 steps: under the share
    spaced = RetuneStage(eval_every=25, patience=4, batch_size=8, check_share=0.4).paced(500)
    assert (spaced.eval_every, spaced.patience) == (79, 4)  # 31.25 / 0.4; a plateau needs as many checks
    assert RetuneStage(eval_every=25, patience=4, batch_size=8).paced(500).eval_every == 25  # no share: as set
    with pytest.raises(RecycleError, match=r"Bad policy.stages.retune.check_share=1.5: set a share in \(0, 1\]"):
        policy(RECYCLE, stage(RETUNE, check_share=1.5))


def test_a_re_tuning_checks_as_often_as_its_share_allows(sides, good_prompt, caplog):
    """On 48 validation examples at batch 8 a check costs 3 steps: with a share of 0.4, one every 8 steps."""
    retune = stage(RETUNE, steps=24, eval_every=2, patience=1, check_share=0.4, limit_train=192, until="plateau")
    with caplog.at_level(logging.INFO, logger="mlflow_recycle.policy.stages"):
        outcome = run_policy(policy(RECYCLE, retune, margin=100.0), transfer(sides, "small-a", "small-b"), good_prompt)
    record = outcome.records[-1]
    assert record.stage == "retune" and record.steps % 8 == 0, outcome.summary()
    assert "checking every 8 steps" in caplog.text
    assert not record.reason or record.reason.startswith(f"stopped after {record.steps} of 24 steps: 1 checks")


# ---------------------------------------------------------------------- data for the gate
def test_a_task_without_validation_split_holds_out_train(data_dir, tmp_path):
    data = tmp_path / "no-validation"
    data.mkdir()
    rows = [json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(200)]
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (data / "test.jsonl").write_text("\n".join(rows[:10]) + "\n")
    task = TaskSpec("t", "{text}", (" a", " b"), data=str(data))
    validation, train = read_examples(task, "validation"), read_examples(task, "train")
    assert len(validation) == 20 and len(train) == 180
    assert not {t for t, _ in validation} & {t for t, _ in train}  # never the same rows
    assert validation == read_examples(task, "validation")  # the same slice every time


def test_each_distinct_map_is_fitted_once_per_pair(sides):
    fits: list = []
    pair = transfer(sides, "small-a", "small-b", fits)
    plain, ridged = RecyclerChoice("linear"), RecyclerChoice("linear", {"ridge": 1.0})
    refined = RecyclerChoice("linear", refine=policy(RECYCLE, REFINE).stage("refine").settings)  # the same map, refined
    assert pair.recycler(plain) is pair.recycler(refined) and pair.recycler(ridged) is not pair.recycler(plain)
    assert fits == ["fit linear", "fit linear"]  # two fits: plain (also refined's) and ridged
    assert pair.costs["recycler_fit_seconds"] > 0 and pair.costs["anchors_used"] > 0  # what fitting cost, for the run


# ---------------------------------------------------------------------- a map trained on behaviour
def divergence(teacher: LoadedModel, prompt: SoftPrompt, student: LoadedModel, mapped: torch.Tensor, texts) -> float:
    """KL(teacher ‖ student) over the classes on ``texts``: ``teacher`` reading ``prompt``, ``student`` ``mapped``."""
    from lightning_modules.distillation import class_kl
    from mlflow_recycle.prompted_lm import PromptedLM

    def scores(side: LoadedModel, embeddings: torch.Tensor) -> torch.Tensor:
        encoder = TaskEncoder(side.tokenizer, prompt.task)
        with torch.no_grad():
            batch = encoder.scoring_batch(encoder.contexts(texts))
            return PromptedLM(side.model).class_scores(embeddings, batch, prompt.task.length_normalize)

    return float(class_kl(scores(teacher, prompt.embeddings), scores(student, mapped), 1.0)[0])


def test_a_map_trained_on_behaviour_carries_the_sources_decisions_across_seeds(sides, good_prompt):
    """small-a -> small-b: a few dozen label-free steps on linear's map itself bring the target's class
    distribution closer to the source's on inputs it never trained on, and leave the fitted map as it was."""
    from mlflow_recycle.refine import DistillSettings, distill_map, unlabelled_texts

    source, target = sides("small-a"), sides("small-b")
    fitted = fit_recycler(get_recycler("linear"), source.model, source.tokenizer, target.model, target.tokenizer)
    before = fitted.weight.clone()
    settings = DistillSettings(steps=40, texts=320, batch_size=8, lr=0.01)
    trained, outcome = distill_map(source, [good_prompt], target, fitted, settings, trainer)
    assert outcome.steps == 40 and outcome.compute.flops > 0 and outcome.agreement is not None
    assert torch.equal(fitted.weight, before) and not torch.equal(trained.weight, before)
    assert trained.behaviour == {**settings.__dict__, "prompts": 1, "task": good_prompt.task.name}
    held_out = [text for text, _ in read_examples(good_prompt.task, "validation")][:96]
    assert not set(held_out) & set(unlabelled_texts(good_prompt, "train", 320, 0))
    untrained = divergence(source, good_prompt, target, fitted.transform(good_prompt.embeddings), held_out)
    learned = divergence(source, good_prompt, target, trained.transform(good_prompt.embeddings), held_out)
    assert learned < 0.9 * untrained, (untrained, learned)  # 0.126 -> 0.096 here (2026-12-05)


def test_a_trained_map_is_trained_once_per_task_on_its_prompts_and_costed_apart(sides, good_prompt):
    """Two prompts of one task, one of another: the map trains once per task, on that task's prompts,
    and its compute is the transfer's (map_flops, on the first prompt to need it), not a prompt's."""
    other_task = good_prompt.replace(task=good_prompt.task.replace(name="sst2-again"))
    second = good_prompt.replace(embeddings=good_prompt.embeddings.flip(0))
    made: list = []
    pair = transfer(sides, "small-a", "small-b", made, prompts=[good_prompt, second, other_task])
    assert [p.task.name for p in pair.peers(good_prompt)] == ["sst2", "sst2"]  # itself, not twice
    assert len(pair.peers(good_prompt.replace(embeddings=good_prompt.embeddings * 2))) == 3  # one not held
    trained = {"name": "linear", "train_map": {"steps": 3, "texts": 32, "batch_size": 4}}
    rule = policy(recycling(trained), margin=-100)  # passes: the test is the cost
    first, again = run_policy(rule, pair, good_prompt), run_policy(rule, pair, second)
    assert made == ["fit linear", 2]  # the anchor fit, then one training on the task's two prompts
    assert list(first.records[0].tried) == ["linear+map(3)"]
    assert first.prompt.recycler_config["behaviour"]["prompts"] == 2
    assert first.map_flops > 0 and again.map_flops == 0 and first.metrics()["policy/map_flops"] == first.map_flops
    # the recycle stage's own compute is its gate check, the same for both prompts: the map is not in it
    assert first.records[0].flops == again.records[0].flops > 0
    run_policy(rule, pair, other_task)
    assert made == ["fit linear", 2, 1]  # another task: another map, on its one prompt


# eight a pass: slow (~8 s), as test_gate_checks_in_one_pass_decide_as_one_at_a_time checks shared passes in CI
@pytest.mark.parametrize("per_pass", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_a_map_is_trained_only_when_enough_prompts_fail_the_free_maps(sides, good_prompt, per_pass):
    """``when: enough_failing``: before training a map, the transfer's other prompts of the task are
    checked with the maps tried before it; it trains only when at least ``min_prompts`` of them (this one
    included) fail. No check is made again when its prompt's turn comes. One prompt a pass: the checks
    made ahead decide on the map, its cost. Several a pass: the prompts' checks are made together, and
    each prompt's run pays its share."""
    made: list = []
    broken = [good_prompt.replace(embeddings=good_prompt.embeddings * k) for k in (-1.0, 8.0)]
    held = [good_prompt, *broken]

    def rule(min_prompts: int) -> Policy:
        trained = {"name": "linear", "when": "enough_failing", "min_prompts": min_prompts,
                   "train_map": {"steps": 2, "texts": 16, "batch_size": 4}}  # fmt: skip
        return policy(recycling({"name": "identity"}, trained), margin=5)

    # small-a -> small-a: identity carries the tuned prompt, not the broken ones
    strict = transfer(sides, "small-a", "small-a", made, prompts=held, prompts_per_pass=per_pass)
    first = run_policy(rule(3), strict, broken[0])
    assert first.records[0].tried["identity"] < first.threshold  # the fixture: a broken prompt fails identity
    assert list(first.records[0].tried) == ["identity"] and made == ["fit identity"]  # no map trained
    good, second = run_policy(rule(3), strict, good_prompt), run_policy(rule(3), strict, broken[1])
    assert good.stage == "recycle" and second.records[0].tried["identity"] < second.threshold
    if per_pass == 1:  # the first run made the other two prompts' identity checks as the map's cost
        assert first.map_flops == 2 * first.records[0].flops > 0
        assert good.records[0].flops == second.records[0].flops == good.map_flops == 0
    else:  # the first run made the three prompts' identity checks in one pass: each run pays its share
        assert first.records[0].flops == good.records[0].flops == second.records[0].flops > 0
        assert first.map_flops == good.map_flops == second.map_flops == 0

    made.clear()
    eager = transfer(sides, "small-a", "small-a", made, prompts=held, prompts_per_pass=per_pass)
    outcome = run_policy(rule(2), eager, broken[0])  # two of three fail identity: enough for min_prompts=2
    assert list(outcome.records[0].tried) == ["identity", "linear+map(2)"] and made == ["fit identity", "fit linear", 3]
    assert outcome.records[0].flops == first.records[0].flops * 2  # its own two checks
    eager.seed = 1  # another validation draw: no new count once the map is trained, its use costs a check
    again = run_policy(rule(2), eager, broken[1])
    assert again.map_flops == 0 and made == ["fit identity", "fit linear", 3]
    assert "linear+map(2)" in again.records[0].tried


def test_gate_checks_in_one_pass_decide_as_one_at_a_time(sides, good_prompt):
    """Three prompts of one task checked in one pass (eval.prompts_per_pass=8) or one at a time (1): the
    same scores within float tolerance, the same stage, verdict and cost in FLOPs for each prompt."""
    held = [
        good_prompt,
        good_prompt.replace(embeddings=-good_prompt.embeddings),
        good_prompt.replace(embeddings=good_prompt.embeddings.flip(0)),
    ]
    rule = policy(recycling({"name": "identity"}, {"name": "linear"}))
    outcomes = {}
    for per_pass in (8, 1):
        pair = transfer(sides, "small-a", "small-b", prompts=held, prompts_per_pass=per_pass)
        outcomes[per_pass] = [run_policy(rule, pair, prompt) for prompt in held]
    for batched, alone in zip(outcomes[8], outcomes[1], strict=True):
        assert (batched.gate, batched.stage, list(batched.records[0].tried)) == (
            alone.gate,
            alone.stage,
            list(alone.records[0].tried),
        )
        for method, score in alone.records[0].tried.items():
            assert batched.records[0].tried[method] == pytest.approx(score, abs=1e-6)
        assert batched.records[0].flops == pytest.approx(alone.records[0].flops)
    assert len({o.records[0].tried["identity"] for o in outcomes[8]}) > 1  # the prompts score apart


@pytest.mark.slow  # ~15 s: test_stacked checks a stack tunes as each prompt alone in CI
def test_prompts_retuned_in_one_stack_end_as_each_alone(sides, good_prompt):
    """Three prompts that fail the map re-tune as one stack (eval.prompts_per_pass=8) or one at a time (1):
    each ends with the same stage, verdict, steps, score and prompt, and pays its own share."""
    held = [good_prompt.replace(embeddings=good_prompt.embeddings * k) for k in (0.5, -1.0, 2.0)]
    retune = ("retune", {**RETUNE[1], "steps": 6, "patience": 1})
    rule = policy(recycling({"name": "identity"}), retune, margin=8)
    outcomes = {}
    for per_pass in (8, 1):
        pair = transfer(sides, "small-a", "small-a-early", prompts=held, prompts_per_pass=per_pass)
        outcomes[per_pass] = [run_policy(rule, pair, prompt) for prompt in held]
    for together, alone in zip(outcomes[8], outcomes[1], strict=True):
        assert [r.stage for r in together.records] == [r.stage for r in alone.records] == ["recycle", "retune"]
        assert (together.gate, together.records[1].steps) == (alone.gate, alone.records[1].steps)
        assert together.score == pytest.approx(alone.score, abs=1e-6)
        torch.testing.assert_close(together.prompt.embeddings, alone.prompt.embeddings, atol=1e-4, rtol=1e-4)
        assert together.records[1].flops > 0
    assert sum(o.records[1].flops for o in outcomes[8]) == pytest.approx(sum(o.records[1].flops for o in outcomes[1]))


@pytest.mark.parametrize(
    "preset", ["default", pytest.param("fast", marks=pytest.mark.slow), pytest.param("recycle", marks=pytest.mark.slow)]
)  # ~30 s each: the default in CI, the other two with -m slow
def test_each_preset_composes_and_runs_on_a_small_model(preset, sides, good_prompt):
    """conf/policy/<preset>.yaml as a migration composes it, run on small-a -> small-a (the same space:
    identity keeps the whole gain). What each promises shows in its bar: default keeps a share of the
    source's gain over a floor of standard errors, fast has the floor alone, recycle the best baseline."""
    from mlflow_recycle.config import compose
    from mlflow_recycle.policy import build_policy

    budgets = ["policy.stages.retune.steps=4", "policy.stages.retune.eval_every=2"] if preset != "recycle" else []
    policy = build_policy(compose([f"policy={preset}", *budgets], config_name="migrate"))
    outcome = run_policy(policy, transfer(sides, "small-a", "small-a", limit_val=200), good_prompt)
    bar, best = outcome.bar, outcome.baselines.best("validation")
    assert outcome.records[0].stage == "recycle" and outcome.gate == policy.gate.verdict(outcome.score, bar)
    if preset == "default":
        assert bar.keep == pytest.approx(best + 0.9 * bar.source_gain) and bar.floor > best
        assert outcome.records[0].method == "identity" and outcome.gain_kept == pytest.approx(1.0)
        assert policy.stage("retune").until == "plateau"  # re-tuning goes on while it improves
    elif preset == "fast":
        assert bar.keep is None and bar.floor > best and outcome.gain_kept is None
        assert policy.stage("retune").until == "bar"  # and stops at the first check over the floor
    else:
        assert [s.name for s in policy.stages] == ["recycle"] and bar.threshold == pytest.approx(best)
    assert [s.name for s in policy.stages if not getattr(s, "skip", False)] == (
        ["recycle"] if preset == "recycle" else ["recycle", "retune"]
    )
