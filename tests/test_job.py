"""The main job end to end: CLI, `mlflow run`, Hydra multirun, DDP, and early errors."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from mlflow_recycle import IncompatibleModelError, RecycleError, SoftPrompt, soft_prompt
from mlflow_recycle.config import REPO_ROOT, compose
from mlflow_recycle.evaluation import Evaluator
from mlflow_recycle.job import TAG_VERDICT, data_module, prepare, task_spec
from mlflow_recycle.models import load_model
from mlflow_recycle.registry import (
    KIND_PROMPT,
    TAG_DIGEST,
    TAG_KIND,
    TAG_RECYCLED_FROM,
    TAG_RECYCLER,
    base_versions,
    prompts_for,
)
from tests.servers import run_watched, seeded_store

# experiment=quick registers nothing (smoke runs keep a registry clean); these tests check what
# registration does, so they turn it on.
QUICK = ["experiment=quick", "registry.register=true"]


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = seeded_store(tmp_path)
    return env


def hydra_dirs(tmp_path: Path) -> list[str]:
    return [f"hydra.run.dir={tmp_path}/hydra", f"hydra.sweep.dir={tmp_path}/sweep"]


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlflow_recycle", *args, *hydra_dirs(tmp_path)]
    return run_watched(command, cwd=tmp_path, env=clean_env(tmp_path))


def runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_mlflow_run_entry_point_end_to_end(tmp_path):
    # a source model's recipe: block, and an override of one of its settings, which stays the user's
    recipe = [
        "++source.recipe.prompt.gamma=0.5", "++source.recipe.prompt.optimizer.lr=0.05", "prompt.optimizer.lr=0.07"
    ]  # fmt: skip
    overrides = " ".join([*QUICK, "retune=true", *recipe, *hydra_dirs(tmp_path)])
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO_ROOT),
        "--env-manager",
        "local",
        "-P",
        "recycler=procrustes",
        "-P",
        "policy=recycle",  # the recycler alone: under the default policy identity comes first on this pair
        "-P",
        f"overrides={overrides}",
    ]
    result = run_watched(command, cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)  # the job resumed the run `mlflow run` created
    assert run.info.status == "FINISHED"
    metrics, params = run.data.metrics, run.data.params
    assert params["recycler.name"] == "procrustes" and params["source.name"] == "small-a-early"
    assert (params["prompt.gamma"], params["prompt.optimizer.lr"]) == ("0.5", "0.07")  # the settings that ran
    best = max(metrics["test/zero_shot_accuracy"], metrics["test/random_prompt_accuracy"])
    assert metrics["test/best_baseline_accuracy"] == best
    assert metrics["success"] == float(metrics["test/recycled_accuracy"] > best)
    assert run.data.tags["mlflow_recycle.verdict"] == ("success" if metrics["success"] else "failure")
    # the UI shows the summary first, as the run's Description; the run names each prompt's tie, no more
    assert "main job on sst2_plain: small-a-early → small-a" in run.data.tags[MLFLOW_RUN_NOTE]
    assert run.data.tags["mlflow_recycle.recycled_prompt.base_model_version"] == "2"
    assert not [k for k in run.data.tags if k.startswith("mlflow_recycle.recycled_prompt.") and "base_model" not in k]
    assert {"source_tune_seconds", "target_tune_seconds", "recycle_seconds", "source/train_loss"} <= set(metrics)
    client = mlflow.MlflowClient()
    assert {"config.yaml", "recycling_results.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # `mlflow run` chose the experiment (Default, without --experiment-name): the logged config says
    # so, and the job told the user how to keep runs together
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
    assert config["mlflow"]["experiment"] == mlflow.get_experiment(run.info.experiment_id).name == "Default"
    assert "--experiment-name mlflow-recycle" in result.stdout + result.stderr
    # no warnings a user cannot act on (hub model card and licence of a local model, Lightning internals)
    assert not any(w in result.stdout + result.stderr for w in ("license information", "model card", "LeafSpec"))
    # Both base models registered (small-a-early first: version 1), both prompts tied to them.
    bases = {int(v.version): v.tags[TAG_DIGEST] for v in base_versions("imdb-lm")}
    assert sorted(bases) == [1, 2]
    (source_version,) = prompts_for("imdb-lm", 1)
    (recycled_version,) = prompts_for("imdb-lm", 2)
    assert (source_version.name, recycled_version.name) == ("imdb-lm-sst2_plain-prompt", "imdb-lm-sst2_plain-prompt")
    assert recycled_version.tags[TAG_RECYCLED_FROM] == f"models:/imdb-lm-sst2_plain-prompt/{source_version.version}"
    assert recycled_version.tags[TAG_RECYCLER] == "procrustes"
    assert recycled_version.run_id == run.info.run_id
    recycled = soft_prompt.load_model(f"models:/imdb-lm-sst2_plain-prompt/{recycled_version.version}")
    assert (recycled.recycler, recycled.base_model, recycled.base_model_version) == ("procrustes", "imdb-lm", "2")
    assert recycled.base_model_uri == "models:/imdb-lm/2" and recycled.task.template == "{text}"
    # the reported accuracy is the registered prompt's, measured again here on the same test examples
    cfg = compose(QUICK)
    target = load_model(cfg.target)
    data = data_module(target, task_spec(cfg.task), cfg)
    evaluator = Evaluator(instantiate(cfg.trainer, _partial_=True), ("test",), 0)
    assert evaluator.accuracy(target, data, recycled.embeddings, "check")["test"] == metrics["test/recycled_accuracy"]
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in logged].count("retuned_prompt") == 1  # logged with the run, not registered


@pytest.mark.slow  # ~25 s: two jobs under Hydra multirun; CI runs the job through `mlflow run`
def test_multirun_gives_one_parent_and_a_nested_run_per_job(tmp_path):
    result = run_cli(tmp_path, "-m", "recycler=linear,identity", "policy=recycle", *QUICK, "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    all_runs = runs(tmp_path)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["recycler.name"] for c in children} == {"linear", "identity"}
    assert parents[0].info.status == "FINISHED"
    assert len({c.info.run_name for c in children}) == 2  # each child has its own name
    # the parent compares its children: a row per child with its swept settings, accuracies and verdict
    summary = mlflow.artifacts.load_dict(f"runs:/{parents[0].info.run_id}/multirun_summary.json")
    rows = dict(zip(summary["columns"], zip(*summary["data"], strict=True), strict=True))
    assert sorted(rows["recycler.name"]) == ["identity", "linear"] and len(rows["run"]) == 2
    by_name = {c.info.run_name: c for c in children}
    for name, accuracy in zip(rows["run"], rows["test/recycled_accuracy"], strict=True):
        assert accuracy == by_name[name].data.metrics["test/recycled_accuracy"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)}
    assert {"multirun_summary.md", "multirun_comparison.png"} <= artifacts
    # the second job found both base models by their weights instead of registering them again,
    # and the source prompt both jobs tuned (the same prompt) is one version; each recycled one has its own
    assert len(base_versions("imdb-lm")) == 2
    assert [len(prompts_for("imdb-lm", v)) for v in (1, 2)] == [1, 2]
    (source,) = prompts_for("imdb-lm", 1)
    assert {v.tags[TAG_RECYCLED_FROM] for v in prompts_for("imdb-lm", 2)} == {f"models:/{source.name}/{source.version}"}
    assert {v.tags[TAG_VERDICT] for v in prompts_for("imdb-lm", 2)} <= {"success", "failure"}


@pytest.mark.slow  # ~15 s: a config's default (experiment=quick sets registry.register=false)
def test_a_smoke_run_logs_its_prompts_and_registers_nothing(tmp_path):
    result = run_cli(tmp_path, "experiment=quick")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    logged = mlflow.MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert {m.name for m in logged} == {"source_prompt", "recycled_prompt"}
    assert mlflow.MlflowClient().search_model_versions(f"tags.`{TAG_KIND}` = '{KIND_PROMPT}'") == []


def test_an_interrupted_run_registers_nothing(tmp_path):
    """Ctrl-C during tuning ends the run KILLED, says so in one line, exits non-zero and leaves no
    prompt version (a job registers when it ends)."""
    other = tmp_path / "interrupted"
    other.mkdir()
    command = [sys.executable, "-m", "mlflow_recycle", *QUICK, "trainer.max_steps=100000", *hydra_dirs(other)]
    env = {**clean_env(other), "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        command,
        cwd=other,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a shell's background job ignores SIGINT, and so would its children: Ctrl-C as a terminal delivers it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    try:
        for line in job.stdout:  # waits on the job's progress, not on a clock
            lines.append(line)
            if "Tuning a" in line:
                break
        for _ in range(5):  # Ctrl-C, again if a library swallowed it (as a user would press it again)
            job.send_signal(signal.SIGINT)
            try:
                lines.append(job.communicate(timeout=120)[0])
                break
            except subprocess.TimeoutExpired:
                continue
        output = "".join(lines)
    finally:
        job.kill()  # never leave a 100,000-step job behind, whatever failed above
    # 130 when the interrupt lands outside training; Lightning exits 1 when it lands inside
    assert job.returncode in (130, 1), output[-3000:]
    assert sum("Interrupted: MLflow run" in line for line in output.splitlines()) == 1
    assert "Traceback" not in output
    (interrupted,) = runs(other)
    assert interrupted.info.status == "KILLED"
    assert mlflow.MlflowClient().search_model_versions(f"tags.`{TAG_KIND}` = '{KIND_PROMPT}'") == []


def test_ddp_on_two_cpu_processes_gives_one_run(tmp_path):
    result = run_cli(tmp_path, "trainer=ddp_cpu", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    assert "test/recycled_accuracy" in run.data.metrics and "source/train_loss" in run.data.metrics


@pytest.mark.slow  # ~13 s: the message is test_bad_input_fails_before_training's, the exit path the prompt_uri test's
def test_cli_error_is_clear_and_nothing_is_logged(tmp_path):
    result = run_cli(tmp_path, *QUICK, "recycler.name=lnear")
    assert result.returncode == 2
    assert "Unknown recycler 'lnear'. Known recyclers:" in result.stderr + result.stdout
    assert not (tmp_path / "mlflow.db").exists() or runs(tmp_path) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "conf" / "recycler").glob("*.yaml")))
def test_every_recycler_config_builds_its_recycler(name):
    from mlflow_recycle.recyclers import get_recycler
    from mlflow_recycle.refine import refine_settings

    cfg = compose([f"recycler={name}"]).recycler
    options = dict(cfg.get("options", {}))
    recorded = get_recycler(cfg.name, **options).options()
    shared = recorded.keys() & options.keys()
    assert {key: recorded[key] for key in shared} == {key: options[key] for key in shared}
    assert (refine_settings(cfg) is not None) == ("refine" in cfg)


# ---------------------------------------------------------------------- early errors
@pytest.mark.parametrize("group", ["recycler=lnear", "task=sst3", "model@source=small-z"])
def test_unknown_config_names_list_the_options(group):
    with pytest.raises(MissingConfigException, match="Available options in"):
        compose([group])


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("recycler.name=lnear", "Unknown recycler 'lnear'"),
        ("task.template='Review without placeholder'", r"has no '\{text\}' placeholder"),
        ("task.max_length=250", "more than small-a-early supports"),
        ("job=recycle", "job=recycle needs prompt_uri"),
        ("task.data=/nonexistent/sst2", "does not exist: set task.data"),
        ("model@target=small-c", None),  # the cross-tokenizer pair is valid
    ],
)
def test_bad_input_fails_before_training(override, error):
    cfg = compose([*QUICK, override])
    if error is None:
        assert prepare(cfg).target.name == "small-c"
        return
    with pytest.raises(RecycleError, match=error):
        prepare(cfg)


def test_a_prompt_that_does_not_fit_the_source_is_refused(tmp_path, load_model):
    _, small_c_tokenizer = load_model("small-c")
    from mlflow_recycle.vocab import tokenizer_fingerprint

    SoftPrompt(torch.randn(4, 320), base_model="large").save(tmp_path / "wide")
    with pytest.raises(IncompatibleModelError, match="embedding dim 320 vs 256"):
        prepare(compose([*QUICK, f"prompt_uri={tmp_path / 'wide'}"]))
    SoftPrompt(
        torch.randn(4, 256), base_model="small-c", tokenizer_fingerprint=tokenizer_fingerprint(small_c_tokenizer)
    ).save(tmp_path / "c")
    with pytest.raises(IncompatibleModelError, match="'small-c' does not fit small-a-early .*: tokenizer"):
        prepare(compose([*QUICK, f"prompt_uri={tmp_path / 'c'}"]))


@pytest.mark.slow  # ~30 s: distillation is covered by test_lightning and test_policy
def test_distill_recycler_refines_on_the_target_and_records_it(tmp_path):
    result = run_cli(tmp_path, *QUICK, "recycler=distill", "recycler.refine.steps=2", "recycler.refine.texts=32")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    (recycled,) = prompts_for("imdb-lm", 2)
    assert recycled.tags[TAG_RECYCLER] == "linear+distill"
    prompt = soft_prompt.load_model(f"models:/{recycled.name}/{recycled.version}")
    assert prompt.recycler_config["refine"]["steps"] == 2 and "test/recycled_accuracy" in run.data.metrics
    assert run.data.params["recycler.method"] == "linear+distill(2)"  # what ran, in the UI's params


@pytest.mark.slow  # ~45 s: each stage's record and tags are covered by test_policy and test_migrate
def test_main_job_runs_the_migration_policy_and_records_each_stage(tmp_path):
    """`policy=default` with a gate no prompt can pass: every stage runs its whole budget, and the run says so."""
    budgets = ["policy.stages.refine.steps=2", "policy.stages.refine.eval_every=1", "policy.stages.refine.texts=16"]
    budgets += ["policy.stages.retune.steps=2", "policy.stages.retune.eval_every=1", "policy.gate.margin=100"]
    budgets += ["policy.stages.retune.check_share=null"]  # a check every step, dear as it is
    budgets += ["policy.stages.refine.skip=false"]
    result = run_cli(tmp_path, *QUICK, "policy=default", *budgets)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.data.tags["mlflow_recycle.gate"] == "failed" and run.data.tags["mlflow_recycle.stage"] == "none"
    assert "does not beat" in run.data.tags["mlflow_recycle.gate_reason"]
    metrics = run.data.metrics
    assert metrics["policy/refine/steps"] == 2 and metrics["policy/retune/steps"] == 2 and metrics["policy/steps"] == 4
    assert metrics["policy/gate_threshold"] > 1  # 100 points above the best baseline
    stages = [metrics[f"policy/{stage}/flops"] for stage in ("recycle", "refine", "retune")]
    assert min(stages) > 0 and metrics["policy/flops"] == pytest.approx(sum(stages))  # compute, counted
    assert metrics["source_tune_flops"] > 0 and "FLOPs" in result.stdout + result.stderr
    assert metrics["anchors_used"] == 500 and metrics["anchors_found"] >= 4000  # every fit says what it fitted on
    (recycled,) = prompts_for("imdb-lm", 2)  # registered and tagged as a migration tags it
    assert (recycled.tags["mlflow_recycle.gate"], recycled.tags["mlflow_recycle.stage"]) == ("failed", "none")
    assert float(recycled.tags["mlflow_recycle.metric.policy/steps"]) == 4


def test_a_models_recipe_reaches_every_tuning_of_it():
    from mlflow_recycle.config import with_recipe
    from mlflow_recycle.policy import build_policy

    # as a `recipe:` block in conf/model/large.yaml would set it
    recipe = ["model@source=large", "++source.recipe.prompt.optimizer.lr=0.05"]
    cfg = compose([*recipe, "model@target=small-a"])
    default = cfg.prompt.optimizer.lr
    assert with_recipe(cfg, cfg.source).prompt.optimizer.lr == 0.05 and default != 0.05
    assert with_recipe(cfg, cfg.target) is cfg  # small-a has no recipe of its own
    # and the migration's retune stage, which tunes with the target's recipe
    flipped = compose(["model@target=large", "policy=default", "++target.recipe.prompt.optimizer.lr=0.05"])
    assert build_policy(flipped, flipped.target).stage("retune").optimizer["lr"] == 0.05
    assert build_policy(compose(["policy=default"])).stage("retune").optimizer["lr"] == default
    # what the run's overrides name is the user's choice, kept over the recipe (a sweep over it sweeps it)
    mine = compose([*recipe, "prompt.optimizer.lr=0.07", "++source.recipe.trainer.max_steps=9"])
    assert mine.overridden == [
        "source", "source.recipe.prompt.optimizer.lr", "prompt.optimizer.lr", "source.recipe.trainer.max_steps"
    ]  # fmt: skip
    tuned = with_recipe(mine, mine.source)
    assert (tuned.prompt.optimizer.lr, tuned.trainer.max_steps) == (0.07, 9)
    # a group pick (prompt/scheduler=...) keeps the whole group over the recipe's settings in it
    picked = compose([*recipe, "prompt/scheduler=one_cycle", "++source.recipe.prompt.scheduler._partial_=false"])
    assert "prompt.scheduler" in picked.overridden
    assert with_recipe(picked, picked.source).prompt.scheduler._partial_ is True
    bad = compose(["model@source=large", "++source.recipe.optimizer.lr=1"])
    with pytest.raises(RecycleError, match=r"recipe may set `prompt`, `trainer` and `task.batch_size`"):
        with_recipe(bad, bad.source)
    task = compose(["model@source=large", "++source.recipe.task.max_length=64"])  # the task is not the model's
    with pytest.raises(RecycleError, match=r"not \['task.max_length'\]"):
        with_recipe(task, task.source)


def test_a_recipes_batch_size_reaches_the_jobs_data_and_the_retune_stage():
    from mlflow_recycle.job import prepare
    from mlflow_recycle.policy import build_policy

    small = ["task.limit_train=64", "eval.limit_val=8", "eval.limit_test=8"]
    cfg = compose(["model@target=large", "policy=default", "++target.recipe.task.batch_size=4", *small])
    setup = prepare(cfg)
    assert (setup.target_data.batch_size, setup.source_data.batch_size) == (4, cfg.task.batch_size) != (4, 4)
    assert build_policy(cfg, cfg.target).stage("retune").batch_size == 4


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A SQLite store for in-process jobs, its artifacts (./mlruns) beside it; the global tracking URI
    is restored afterwards."""
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    yield seeded_store(tmp_path)
    mlflow.set_tracking_uri(previous)


def test_each_job_in_one_process_chooses_its_experiment_in_its_own_store(tmp_path, monkeypatch):
    """``mlflow.set_experiment`` exports MLFLOW_EXPERIMENT_ID; a later job against another
    store must not take that id for the caller's choice (CI failed on exactly this)."""
    from mlflow_recycle.tracking import configure

    previous = mlflow.get_tracking_uri()
    try:
        for store, experiment in (("one", "first"), ("two", "second")):
            for name in (f"{experiment}-filler", experiment):  # ids differ between the two stores
                configure(f"sqlite:///{tmp_path}/{store}.db", name)
            with mlflow.start_run() as run:
                pass
            assert mlflow.get_experiment(run.info.experiment_id).name == experiment
        # an id the caller exported (as `mlflow run --experiment-id` does) still wins
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
        configure(f"sqlite:///{tmp_path}/two.db", "ignored")
        with mlflow.start_run() as run:
            pass
        assert run.info.experiment_id == "0" and mlflow.get_experiment_by_name("ignored") is None
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow  # ~13 s: every job test in CI logs its curves through the default (MLflow) logger
def test_the_logger_group_chooses_where_training_curves_go(tracking, tmp_path, monkeypatch):
    from mlflow_recycle.job import run

    monkeypatch.chdir(tmp_path)  # logger=csv writes under ./logs
    base = [*QUICK, f"mlflow.tracking_uri={tracking}", "job=tune", "registry.register=false"]
    for logger in ("mlflow", "csv"):
        run(compose([*base, f"logger={logger}", f"mlflow.run_name=curves-in-{logger}"]))
    (curves,) = (tmp_path / "logs" / "curves").glob("version_*/metrics.csv")
    assert "source/train_loss" in curves.read_text().splitlines()[0]
    for logger, in_run in (("mlflow", True), ("csv", False)):
        (job,) = mlflow.search_runs(filter_string=f"attributes.run_name = 'curves-in-{logger}'", output_format="list")
        assert ("source/train_loss" in job.data.metrics) == in_run


def test_tune_recycle_and_evaluate_entry_points_chain(tracking, caplog):
    from mlflow_recycle.job import run

    base = [*QUICK, f"mlflow.tracking_uri={tracking}", "policy=recycle"]  # the map alone: what evaluate re-reads
    with caplog.at_level(logging.INFO, logger="mlflow_recycle.evaluation"):
        tuned = run(compose([*base, "job=tune"]))
    (source,) = prompts_for("imdb-lm", 1)
    assert "test/source_accuracy" in tuned and "policy/steps" not in tuned  # tuning alone: no policy ran
    # the kept prompt's validation score is its tuning's: validation is not measured again, test once
    measured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source on ")]
    assert len(measured) == 1 and "/test:" in measured[0] and "validation/source_accuracy" in tuned
    # the job moved the alias `source` to the prompt it tuned: the next job names it without a version number
    recycled = run(compose([*base, "job=recycle", "prompt_uri=models:/imdb-lm-sst2_plain-prompt@source"]))
    (target,) = prompts_for("imdb-lm", 2)
    assert (
        mlflow.MlflowClient().get_model_version_by_alias("imdb-lm-sst2_plain-prompt", "recycled").version
        == target.version
    )
    assert target.tags[TAG_RECYCLED_FROM] == f"models:/imdb-lm-sst2_plain-prompt/{source.version}"
    assert target.tags[TAG_RECYCLER] == "linear"
    # what a person reads first on the version's page: where it came from, the verdict, the cost
    assert target.description.startswith(
        f"Migrated from models:/imdb-lm-sst2_plain-prompt/{source.version} to imdb-lm v2 by linear:"
    )
    assert "Cost: 0 training steps" in target.description
    evaluated = run(compose([*base, "job=evaluate", "prompt_uri=models:/imdb-lm-sst2_plain-prompt@recycled"]))
    # the evaluate job measures on validation exactly what the recycle job's gate saw
    assert evaluated["validation/prompt_accuracy"] == recycled["policy/recycle/gate_accuracy"]
    gate_passed = recycled["policy/recycle/gate_accuracy"] > recycled["policy/gate_threshold"]
    assert target.tags["mlflow_recycle.gate"] == ("passed" if gate_passed else "failed")


def test_a_prompt_uri_that_does_not_exist_is_one_line_before_any_model_loads(tmp_path):
    result = run_cli(tmp_path, *QUICK, "job=evaluate", "prompt_uri=models:/imdb-lm-sst2_plain-prompt/99")
    assert result.returncode == 2
    output = result.stdout + result.stderr  # Hydra's log handler writes to stdout
    error = [line for line in output.splitlines() if "ERROR" in line]
    assert len(error) == 1 and "Cannot load the prompt 'models:/imdb-lm-sst2_plain-prompt/99'" in error[0]
    assert "Traceback" not in output and "Loaded small-a" not in output


def test_the_data_and_module_groups_build_what_the_job_trains_with():
    """lightning-hydra-template's shape: `data` and `module` are `_target_` configs instantiated at
    the entry point; the job hands them what only it knows (tokenizer, model, initial prompt)."""
    from lightning_modules import PromptTuningModule, TextClassificationDataModule

    cfg = compose([*QUICK, "data.batch_size=5", "data.limit_val=7", "module.gamma=0.25"])
    side = load_model(cfg.source)
    data = data_module(side, task_spec(cfg.task), cfg)
    assert isinstance(data, TextClassificationDataModule) and data.batch_size == 5 and data.limits["validation"] == 7
    assert compose(QUICK).data.batch_size == compose(QUICK).task.batch_size  # by default the task's sizes
    module = instantiate(cfg.module)(side.model, torch.zeros(3, 256), anchor=torch.zeros(3, 256))
    assert isinstance(module, PromptTuningModule) and module.gamma == 0.25


def test_prompts_of_unrelated_base_models_go_to_registered_models_of_their_own():
    names = {compose([f"model@source={m}"]).registry.prompt_name for m in ("small-a-early", "small-a", "smollm2-135m")}
    assert names == {"imdb-lm-sst2_plain-prompt", "smollm2-135m-sst2_plain-prompt"}  # one lineage, one model each
