"""Users' own tasks: any column names and label values, any data layout, multi-class reports."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest
import torch

from lightning_modules import TextClassificationDataModule, read_examples
from mlflow_recycle import RecycleError, TaskSpec
from mlflow_recycle.charts import confusion_chart
from mlflow_recycle.evaluation import ClassReport
from mlflow_recycle.prompted_lm import TaskEncoder
from tests.servers import seeded_store

from .test_job import run_cli, runs

TOPICS = {
    "World": ["the president met the prime minister", "elections were held across the country"],
    "Sports": ["the team won the match last night", "the striker scored twice in the final"],
    "Business": ["shares fell as the market closed lower", "the company reported record profits"],
    "Sci/Tech": ["the new chip doubles battery life", "scientists found water on the planet"],
}
NEWS = [" world", " sports", " business", " science"]


def news_rows(copies: int) -> list[tuple[str, str]]:
    return [(topic, f"{text} ({i})") for i in range(copies) for topic, texts in TOPICS.items() for text in texts]


@pytest.mark.slow  # ~23 s: CI runs a job on a task from config only (saved dataset, below); class reports: unit tests
def test_a_headerless_tsv_with_class_names_runs_as_a_four_class_task_with_config_only(tmp_path):
    """AG-News-like data the project never saw: label names in column 0, text in column 1, no header,
    no validation file. The job runs with overrides only and reports every class, not only accuracy."""
    data = tmp_path / "news"
    data.mkdir()
    for split, copies in (("train", 8), ("test", 3)):
        (data / f"{split}.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in news_rows(copies)))
    task = [
        "task.name=news",
        "task.template='{text} Topic:'",
        f"task.verbalizers=[{','.join(repr(v) for v in NEWS)}]",
        "task.labels=[World,Sports,Business,'Sci/Tech']",
        f"task.data={data}",
        "task.header=false",
        "task.text_field=1",
        "task.label_field=0",
        "task.validation_min_words=0",
    ]
    result = run_cli(tmp_path, "experiment=quick", *task)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(tmp_path)
    metrics = run.data.metrics
    recall = {c: metrics[f"test/recycled/recall/{c}"] for c in ("World", "Sports", "Business", "Sci_Tech")}
    shares = [metrics[f"test/recycled/predicted_share/{c}"] for c in recall]
    assert sum(shares) == pytest.approx(1.0) and "test/recycled/macro_f1" in metrics
    # accuracy is the recall of each class weighted by its share of the (balanced) test split
    assert metrics["test/recycled_accuracy"] == pytest.approx(sum(recall.values()) / 4)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "confusion_recycled.png" in artifacts


def test_a_prompt_that_predicts_one_class_shows_in_its_report():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    collapsed = ClassReport.of(labels, torch.full_like(labels, 2), ["World", "Sports", "Business", "Sci/Tech"])
    assert collapsed.accuracy == 0.25
    assert collapsed.recall() == {"World": 0.0, "Sports": 0.0, "Business": 1.0, "Sci/Tech": 0.0}
    assert collapsed.predicted_share()["Business"] == 1.0 and collapsed.macro_f1() == pytest.approx(0.1)
    metrics = collapsed.metrics("test/recycled")
    assert metrics["test/recycled/predicted_share/Business"] == 1.0 and "test/recycled/recall/Sci_Tech" in metrics
    assert confusion_chart(collapsed.confusion, collapsed.classes).axes  # the image a run logs for it


def test_one_data_file_is_split_not_reused(tmp_path, caplog):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"review": f"text {i}", "stars": i % 2}) + "\n" for i in range(200)))
    task = TaskSpec("one", "{text}", (" a", " b"), data=str(path), text_field="review", label_field="stars")
    with caplog.at_level(logging.INFO, logger="lightning_modules.data"):
        splits = {split: read_examples(task, split) for split in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [160, 20, 20]
    texts = [{t for t, _ in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert set().union(*texts) == {f"text {i}" for i in range(200)}
    assert splits["test"] == read_examples(task, "test")  # the same rows every time
    assert "no splits: test is its seeded 10% (20 of 200 rows; train/validation/test 80%/10%/10%)" in caplog.text


def test_a_saved_dataset_and_a_template_over_columns(tmp_path, load_model):
    """A directory written by `datasets`' save_to_disk, two text columns joined by a template,
    labels as names; no validation split in it: 10% of train is held out."""
    import datasets

    rows = {
        "premise": [f"premise {i}" for i in range(60)],
        "hypothesis": [f"hypothesis {i}" for i in range(60)],
        "verdict": ["yes" if i % 3 else "no" for i in range(60)],
    }
    split = datasets.Dataset.from_dict(rows).train_test_split(test_size=10, seed=0)
    split.save_to_disk(str(tmp_path / "saved"))
    task = TaskSpec(
        "nli",
        "{text} Answer:",
        (" no", " yes"),
        data=str(tmp_path / "saved"),
        text_field="{premise} / {hypothesis}",
        label_field="verdict",
    )
    test = read_examples(task, "test")
    assert len(test) == 10 and all(" / hypothesis " in text for text, _ in test)
    assert {(text.split()[1], label) for text, label in test} == {
        (text.split()[1], int(v == "yes")) for text, v in zip(rows["premise"], rows["verdict"], strict=True)
    } & {(text.split()[1], label) for text, label in test}
    assert len(read_examples(task, "validation")) == 5 and len(read_examples(task, "train")) == 45
    _, tokenizer = load_model("small-a")
    data = TextClassificationDataModule(TaskEncoder(tokenizer, task), batch_size=4)
    assert len(data.dataset("test")) == 10
    # and a job runs on it with config only
    from mlflow_recycle.config import compose
    from mlflow_recycle.job import run

    previous = mlflow.get_tracking_uri()
    try:
        overrides = [
            "experiment=quick",
            f"mlflow.tracking_uri={seeded_store(tmp_path)}",
            "job=tune",
            "task.name=nli",
            "task.template='{text} Answer:'",
            "task.verbalizers=[' no',' yes']",
            f"task.data={tmp_path / 'saved'}",
            "task.text_field='{premise} / {hypothesis}'",
            "task.label_field=verdict",
            "task.validation_min_words=0",
        ]
        metrics = run(compose(overrides))
    finally:
        mlflow.set_tracking_uri(previous)
    assert set(metrics) >= {"validation/source_accuracy", "test/source_accuracy"}


def test_bad_data_is_one_error_naming_the_row_and_the_setting(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nfine,World\nodd,Politics\n")
    task = TaskSpec("news", "{text}", tuple(NEWS), data=str(tmp_path), labels=("World", "Sports", "Business", "Sci"))
    with pytest.raises(
        RecycleError,
        match=r"train.csv row 1 \(data rows counted from 0\): label 'Politics' is neither a class index \(0..3\)",
    ):
        read_examples(task, "train")
    with pytest.raises(RecycleError, match="set task.labels to the class names the data uses"):
        read_examples(task, "train")
    with pytest.raises(RecycleError, match=r"a file without header names its columns 0, 1"):
        read_examples(task.replace(header=False), "train")
