"""Migrations in a real SQLite registry: the policy's outcome on each prompt version, the tags a
user finds, the alias rules, reuse of fitted recyclers, idempotence and partial failures."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from mlflow_recycle import RecycleError, SoftPrompt
from mlflow_recycle.config import compose
from mlflow_recycle.migrate import (
    TAG_GATE,
    TAG_GATE_REASON,
    TAG_STAGE,
    MigrationError,
    _move_alias,
    migrate,
)
from mlflow_recycle.registry import (
    TAG_RECYCLED_FROM,
    TAG_WEIGHTS_FROM,
    VERSION_METRICS,
    base_versions,
    load_prompt,
    log_prompt,
    prompts_for,
    register_base_model,
    tie,
)
from tests.servers import seeded_store

PROMPT = Path(__file__).parent / "assets" / "sst2-prompt-small-a"
SMALL = ["eval.limit_val=48", "eval.limit_test=48", "eval.random_prompt_draws=1", "alias=candidate"]
#: what tuning the test prompt from scratch cost (its recorded FLOPs; tests/assets predates counting them)
REFERENCE = 1e15
SMALL += ["policy.gate.margin_se=0"]  # on 48 examples a standard error is 7 points: these tests check the stages
#: the default policy with budgets a test can afford
BUDGETS = ["policy.stages.refine.steps=2", "policy.stages.refine.eval_every=1", "policy.stages.refine.texts=16"]
BUDGETS += ["policy.stages.retune.steps=2", "policy.stages.retune.eval_every=1", "policy.stages.retune.limit_train=16"]
BUDGETS += ["policy.stages.retune.check_share=null"]  # a check every step, dear as it is


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) go beside it
    previous = mlflow.get_tracking_uri()
    uri = seeded_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("migrate-tests")  # MLflow keeps the active experiment of an earlier store otherwise
    yield uri
    mlflow.set_tracking_uri(previous)


def config(store: str, *overrides: str):
    return compose([f"mlflow.tracking_uri={store}", *SMALL, *BUDGETS, *overrides], config_name="migrate")


@pytest.fixture
def registered(store, model_dir, data_dir, reexport):
    """Base model `lm` v1 = small-a with a tuned prompt (`good`) and one whose task data is gone (`nodata`);
    v2 = a re-export of small-a (other files, the same embedding space: identity recycles)."""
    v1 = register_base_model(str(model_dir("small-a")), "lm")
    good = SoftPrompt.load(PROMPT)
    good = good.replace(task=good.task.replace(data=str(data_dir("sst2"))), cost={**good.cost, "flops": REFERENCE})
    versions = {
        "good": log_prompt(tie(good, v1), "prompt", "good-prompt"),
        "nodata": log_prompt(tie(good.replace(task=good.task.replace(data="/gone/sst2")), v1), "prompt", "nodata"),
    }
    register_base_model(str(reexport("small-a")), "lm")
    return versions


def by_name(version: int | str = 2) -> dict:
    return {v.name: v for v in prompts_for("lm", version)}


def test_migration_gates_on_validation_and_tags_what_happened(store, registered):
    report = migrate("lm", 2, cfg=config(store))
    assert report.created == 2 and report.from_version == "1"
    migrated = by_name()
    good, nodata = migrated["good-prompt"].tags, migrated["nodata"].tags
    assert (good[TAG_GATE], good[TAG_STAGE]) == ("passed", "recycle")  # identity: the embedding space is the same
    assert good["mlflow_recycle.recycler"] == "identity"
    version_run = MlflowClient().get_run(migrated["good-prompt"].run_id).data.metrics
    shown = float(good["mlflow_recycle.metric.validation/recycled_accuracy"])
    assert shown == pytest.approx(version_run["validation/recycled_accuracy"], rel=1e-5)
    assert shown > version_run["validation/best_baseline_accuracy"]
    assert "mlflow_recycle.metric.test/recycled_accuracy" in good  # reported next to it, deciding nothing
    assert version_run["policy/steps"] == 0
    # PEFT finds the new base where its weights were registered from, never the old base's path
    (v1, v2) = sorted(base_versions("lm"), key=lambda v: int(v.version))
    new_base = v2.tags[TAG_WEIGHTS_FROM]
    assert Path(new_base).is_dir() and new_base != v1.tags[TAG_WEIGHTS_FROM]
    adapter = load_prompt(f"models:/good-prompt/{migrated['good-prompt'].version}").peft_config()
    assert adapter["base_model_name_or_path"] == new_base
    assert (nodata[TAG_GATE], nodata[TAG_STAGE]) == ("unevaluated", "none")
    assert "not reachable" in nodata[TAG_GATE_REASON]
    client = MlflowClient()
    assert client.get_model_version_by_alias("good-prompt", "candidate").version == migrated["good-prompt"].version
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("nodata", "candidate")  # never moved to an unevaluated version
    lines = "\n".join(report.lines())
    assert "passed at recycle" in lines and "unevaluated: its task data '/gone/sst2' is not reachable" in lines
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`mlflow_recycle.job` = 'migrate'", output_format="list"
    )
    assert run.data.metrics["passed_prompts"] == 1 and run.data.metrics["migrated_prompts"] == 2
    assert run.data.metrics["total/policy/steps"] == 0
    assert lines in run.data.tags[MLFLOW_RUN_NOTE]  # the report is the run's Description in the UI

    again = migrate("lm", 2, cfg=config(store))  # the same migration again: nothing new
    assert again.created == 0 and len(prompts_for("lm", 2)) == 2
    assert {p.gate for p in again.prompts} == {"passed", "unevaluated"}


def test_a_prompt_failing_every_stage_is_registered_failed_and_the_alias_stays(store, registered):
    migrate("lm", 2, cfg=config(store))
    client = MlflowClient()
    passed = client.get_model_version_by_alias("good-prompt", "candidate").version
    # another policy: a new migration; refining although the teacher cannot pass such a gate either
    refining = ("policy.stages.refine.skip=false",)
    hopeless = migrate("lm", 2, cfg=config(store, "policy.gate.margin=100", *refining))
    (failed,) = [p for p in hopeless.prompts if p.source.startswith("models:/good-prompt")]
    assert failed.created and failed.gate == "failed" and failed.stage is None
    assert "does not beat" in failed.reason
    version = client.get_model_version("good-prompt", failed.target.rsplit("/", 1)[1])
    assert version.tags[TAG_GATE] == "failed" and version.tags[TAG_RECYCLED_FROM] == failed.source
    metric = MlflowClient().get_run(version.run_id).data.metrics  # the detail: the version's run
    assert metric["policy/refine/steps"] == 2 and metric["policy/retune/steps"] == 2  # each stage spent its budget
    shown = {k.removeprefix("mlflow_recycle.metric.") for k in version.tags if k.startswith("mlflow_recycle.metric.")}
    assert shown == set(VERSION_METRICS)  # a few to compare versions by; the rest in its run
    # compute against re-tuning from scratch (v1 and v2 have the same parameters: no scaling)
    assert metric["policy/flops"] > metric["policy/retune/flops"] > 0
    assert metric["retune_reference/flops"] == REFERENCE
    assert metric["policy/compute_fraction"] == pytest.approx(metric["policy/flops"] / REFERENCE, rel=1e-4)
    assert client.get_model_version_by_alias("good-prompt", "candidate").version == passed  # not moved to it
    # the identity map fitted by the first migration was reused, not fitted again
    fits = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'fit identity'")
    assert len(fits) == 1


def test_the_alias_never_moves_backwards(store, registered):
    migrate("lm", 2, cfg=config(store))
    client = MlflowClient()
    newest = by_name()["good-prompt"]
    older = client.get_model_version("good-prompt", registered["good"].version)
    client.set_model_version_tag("good-prompt", older.version, TAG_GATE, "passed")
    _move_alias(client, client.get_model_version("good-prompt", older.version), "candidate")
    assert client.get_model_version_by_alias("good-prompt", "candidate").version == newest.version


def test_a_prompt_that_cannot_migrate_fails_the_migration_after_the_others(store, registered, model_dir):
    v1 = MlflowClient().get_model_version("lm", "1")
    wrong = SoftPrompt(torch.randn(4, 128), task=SoftPrompt.load(PROMPT).task)  # dim 128: not small-a's 256
    log_prompt(tie(wrong, v1), "prompt", "wrong-dim")
    with pytest.raises(MigrationError, match="1 of 3 prompts were not migrated: wrong-dim v1: .*embedding dim"):
        migrate("lm", 2, cfg=config(store))
    assert set(by_name()) == {"good-prompt", "nodata"}  # the others were migrated all the same


def test_migrating_a_model_or_version_that_does_not_exist_says_so(store, registered):
    with pytest.raises(RecycleError, match="'nosuch' has no version 2 .*: no such registered model"):
        migrate("nosuch", 2, cfg=config(store))
    with pytest.raises(RecycleError, match=r"'lm' has no version 7 .* \(its versions: 1, 2\)"):
        migrate("lm", 7, cfg=config(store))


def test_a_prompt_whose_run_broke_is_not_migrated_nor_pending(store, registered):
    """A version registered by a run that then ended KILLED (or FAILED) never completed: reconcile
    does not report its base version as pending, and a migration leaves it out."""
    from mlflow_recycle.migrate import pending_migrations

    good = SoftPrompt.load(PROMPT)
    v1 = MlflowClient().get_model_version("lm", "1")
    with mlflow.start_run() as run:
        log_prompt(tie(good.replace(embeddings=good.embeddings * 2), v1), "prompt", "broken-prompt")
    MlflowClient().set_terminated(run.info.run_id, "KILLED")
    assert [v.name for v in prompts_for("lm", 1)].count("broken-prompt") == 1
    assert "broken-prompt" not in [v.name for v in prompts_for("lm", 1, completed=True)]
    report = migrate("lm", 2, cfg=config(store))
    assert report.created == 2 and "broken-prompt" not in by_name()
    assert pending_migrations(["lm"]) == []


@pytest.mark.slow  # ~20 s: test_policy's trained-map tests run in CI
def test_a_map_trained_on_behaviour_learns_from_every_prompt_of_the_task_once(store, model_dir, data_dir):
    """v1 = small-a with two prompts of one task, v2 = small-b (another seed): `recycler=linear_behaviour`
    trains linear's map once, on both prompts, in its own run; the migration's totals include its
    compute; a later migration of the same pair and prompts reuses the logged map."""
    from mlflow_recycle.registry import load_prompt, model_uri

    v1 = register_base_model(str(model_dir("small-a")), "lm")
    good = SoftPrompt.load(PROMPT)
    good = good.replace(task=good.task.replace(data=str(data_dir("sst2"))), cost={**good.cost, "flops": REFERENCE})
    second = good.replace(embeddings=good.embeddings.flip(0))  # the same task, another prompt
    log_prompt(tie(good, v1), "prompt", "first")
    log_prompt(tie(second, v1), "prompt", "second")
    register_base_model(str(model_dir("small-b")), "lm")
    trained = ["recycler=linear_behaviour", "recycler.train_map.steps=3", "recycler.train_map.texts=32"]
    trained += ["recycler.train_map.batch_size=4"]
    report = migrate("lm", 2, cfg=config(store, *trained))
    assert report.created == 2
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="attributes.run_name LIKE 'train %'", output_format="list"
    )
    assert run.info.run_name == "train linear+map(3) map on 2 prompts"
    assert run.data.metrics["map_steps"] == 3 and run.data.metrics["map_flops"] > 0
    behaviour = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/behaviour.json")
    assert (behaviour["steps"], behaviour["prompts"], behaviour["task"]) == (3, 2, good.task.name)
    for version in prompts_for("lm", 2):
        migrated = load_prompt(model_uri(version.name, version.version))
        assert migrated.recycler_config.get("behaviour") == behaviour, (migrated.recycler, migrated.recycler_config)
    (migration,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`mlflow_recycle.job` = 'migrate'", output_format="list"
    )
    totals = migration.data.metrics
    assert totals["total/policy/map_flops"] >= run.data.metrics["map_flops"]  # with the (free) anchor fit
    spent = totals["total/policy/flops"] + totals["total/policy/map_flops"]
    assert totals["total/compute_fraction"] == pytest.approx(spent / (2 * REFERENCE), rel=1e-4)

    migrate("lm", 2, cfg=config(store, *trained, "policy.gate.margin=100"))  # another policy, the same map
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name LIKE 'train %'")) == 1


def test_a_migration_re_tunes_with_the_new_bases_recipe_and_registers_a_prompt_short_of_its_share_degraded(
    store, model_dir, data_dir
):
    """v2 = small-b registered with a recipe (lr 0: re-tuning cannot move the prompt): the migration re-tunes
    with that recipe, not the config's; the prompt works (over the floor) but keeps less than all of its
    source gain, so it is registered `degraded` with the share it kept, and the alias stays where it was."""
    v1 = register_base_model(str(model_dir("small-a")), "lm")
    good = SoftPrompt.load(PROMPT)
    good = good.replace(task=good.task.replace(data=str(data_dir("sst2"))), cost={**good.cost, "flops": REFERENCE})
    log_prompt(tie(good, v1), "prompt", "good-prompt")
    recipe = {"prompt": {"optimizer": {"lr": 0.0}}}
    assert register_base_model(str(model_dir("small-b")), "lm", recipe=recipe).tags["mlflow_recycle.recipe"]
    # until=bar: under the default until=plateau, a prompt stopped on its plateau passes over the floor
    share = ["policy.gate.margin=-100", "policy.gate.keep_gain=1.0", "policy.stages.retune.patience=1"]
    share += ["policy.stages.retune.until=bar"]
    report = migrate("lm", 2, cfg=config(store, *share))
    (migrated,) = report.prompts
    assert migrated.gate == "degraded" and migrated.stage is None, report.lines()
    assert "degraded: best validation accuracy" in report.lines()[0] and "of the source's gain" in report.lines()[0]
    (version,) = prompts_for("lm", 2)
    assert version.description.startswith("Migrated from models:/good-prompt/1 to lm v2 by identity/linear")
    assert "degraded. Keeps " in version.description and "Cost: " in version.description  # read first in the UI
    kept = float(version.tags["mlflow_recycle.gain_kept"])
    metrics = MlflowClient().get_run(version.run_id).data.metrics  # the tag to sort by, the metric to plot
    assert kept < 1.0 and metrics["policy/gain_kept"] == pytest.approx(kept, abs=1e-3)
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`mlflow_recycle.job` = 'migrate'", output_format="list"
    )
    policy = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/policy.json")
    assert policy["stages"]["retune"]["optimizer"]["lr"] == 0.0  # the new base's recipe, not prompt.optimizer's 0.3
    assert run.data.metrics["degraded_prompts"] == 1 and run.data.metrics["passed_prompts"] == 0
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias("good-prompt", "candidate")  # never moved to a degraded version


def test_a_prompt_whose_own_gate_failed_stays_behind_unless_asked(store, registered):
    """A prompt version the user would not keep on v1 (its own gate failed there) is not migrated, nor
    pending; `include_failed=true` migrates it too."""
    from mlflow_recycle.migrate import pending_migrations

    v1 = MlflowClient().get_model_version("lm", "1")
    good = SoftPrompt.load(PROMPT)
    log_prompt(
        tie(good.replace(embeddings=good.embeddings * 3), v1), "prompt", "gate-failed", tags={TAG_GATE: "failed"}
    )
    report = migrate("lm", 2, cfg=config(store))
    assert report.created == 2 and "gate-failed" not in by_name()
    assert pending_migrations(["lm"]) == []
    again = migrate("lm", 2, cfg=config(store, "include_failed=true"))
    assert again.created == 1 and "gate-failed" in by_name()


def test_two_shards_migrate_every_prompt_once_between_them(store, registered):
    """`shard=i/n` runs side by side split a version's prompts by migration key: together they migrate
    every prompt once; a full migration afterwards finds each one done."""
    good = SoftPrompt.load(PROMPT)
    v1 = MlflowClient().get_model_version("lm", "1")
    for i in range(4):  # six prompts in all, so that both shards get some
        log_prompt(tie(good.replace(embeddings=good.embeddings * (1.1 + i / 10)), v1), "prompt", f"extra-{i}")
    first = migrate("lm", 2, cfg=config(store, "evaluate=false", "shard=0/2"))
    second = migrate("lm", 2, cfg=config(store, "evaluate=false", "shard=1/2"))
    assert first.created and second.created and first.created + second.created == 6
    assert not {p.source for p in first.prompts} & {p.source for p in second.prompts}
    assert len(prompts_for("lm", 2)) == 6
    again = migrate("lm", 2, cfg=config(store, "evaluate=false"))
    assert again.created == 0 and len(again.prompts) == 6
    with pytest.raises(RecycleError, match=r"shard is 'i/n' with 0 <= i < n, e\.g\. shard=0/2; got '2/2'"):
        migrate("lm", 2, cfg=config(store, "evaluate=false", "shard=2/2"))
