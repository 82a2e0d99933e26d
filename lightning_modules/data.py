"""Text-classification data for prompt tuning and rank classification.

Reads local JSONL / JSON / CSV / TSV files (``{data}/{split}.jsonl`` and friends, or one
file), or a Hugging Face ``datasets`` name when that package is installed. Examples are
tokenised once in ``setup`` with the model's :class:`TaskEncoder`; batches are built by the
encoder so that training, evaluation and pyfunc prediction see identical inputs.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mlflow_recycle.errors import RecycleError
from mlflow_recycle.prompted_lm import TaskEncoder

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))


#: Share of ``train`` held out as ``validation`` when a task directory has no validation split.
HELD_OUT_FRACTION = 0.1


def _split_file(path: Path, split: str) -> Path | None:
    return next((path / f"{split}{s}" for s in SUFFIXES if (path / f"{split}{s}").is_file()), None)


def _held_out(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """``validation``: a fixed, seeded slice of ``train``; ``train``: the rest (so they never overlap)."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    held = set(order[: max(1, int(len(rows) * HELD_OUT_FRACTION))])
    return [row for i, row in enumerate(rows) if (i in held) == (split == "validation")]


def read_examples(data: str, split: str, text_field: str = "text", label_field: str = "label") -> list[tuple[str, int]]:
    """``(text, label)`` pairs of one split.

    ``data`` is a directory holding ``{split}.jsonl|json|csv|tsv``, a single such file, or
    (with ``datasets`` installed) a Hugging Face dataset name such as ``"glue/sst2"``. A
    directory without a validation split holds out a fixed 10% of ``train`` as
    ``validation`` (and ``train`` is the rest), so decisions never look at test.
    """
    path = Path(data)
    if path.is_dir():
        file, train = _split_file(path, split), _split_file(path, "train")
        if split in ("train", "validation") and _split_file(path, "validation") is None and train is not None:
            rows = _held_out(_read_file(train), split)
            if split == "validation":
                log.info("%s has no validation split: holding out %d train rows", path, len(rows))
        elif file is None:
            raise RecycleError(
                f"No {split!r} split in {path}: expected one of {', '.join(split + s for s in SUFFIXES)}."
            )
        else:
            rows = _read_file(file)
    elif path.is_file():
        rows = _read_file(path)
    else:
        rows = _read_hub(data, split)
    examples = []
    for i, row in enumerate(rows):
        if text_field not in row or label_field not in row:
            raise RecycleError(
                f"{data} ({split}) row {i} has fields {sorted(row)}; expected {text_field!r} and {label_field!r}: "
                "rename those fields in the data files, or pass text_field= / label_field= to read_examples "
                "or TextClassificationDataModule."
            )
        examples.append((str(row[text_field]), int(row[label_field])))
    return examples


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise RecycleError(
            f"Data {name!r} is neither a local file nor a directory, and the `datasets` package is not installed "
            "to read it from the Hugging Face hub: give a local path or `pip install datasets`."
        ) from None
    config = name.split("/")
    return list(datasets.load_dataset(*config[:2] if len(config) > 1 else config, split=split))


class TokenizedExamples(Dataset):
    """``(index, context ids, label)`` triples; the index survives shuffling and DDP sharding."""

    def __init__(self, contexts: list[list[int]], labels: list[int]) -> None:
        self.contexts, self.labels = contexts, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, list[int], int]:
        return i, self.contexts[i], self.labels[i]


class TextClassificationDataModule(L.LightningDataModule):
    """Splits of one task tokenised for one model.

    Args:
        encoder: the model's :class:`TaskEncoder`; its task's ``data`` says where the files are.
        batch_size / eval_batch_size: examples per training / evaluation batch.
        limit_train / limit_val / limit_test: use a seeded random subset of this many
            examples (for quick runs and for IMDB's 25,000 test reviews).
        seed: seeds the subsets and the shuffling.
    """

    def __init__(
        self,
        encoder: TaskEncoder,
        *,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        text_field: str = "text",
        label_field: str = "label",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if encoder.task.data is None:
            raise RecycleError(
                f"Task {encoder.task.name!r} has no data location (task.data): set it to a directory or file."
            )
        self.encoder = encoder
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.splits = {"train": train_split, "validation": val_split, "test": test_split}
        self.limits = {"train": limit_train, "validation": limit_val, "test": limit_test}
        self.text_field, self.label_field = text_field, label_field
        self.seed, self.num_workers = seed, num_workers
        self.datasets: dict[str, TokenizedExamples] = {}

    def examples(self, stage: str) -> list[tuple[str, int]]:
        """The (possibly subsampled) raw examples of ``stage`` (train / validation / test)."""
        examples = read_examples(self.encoder.task.data, self.splits[stage], self.text_field, self.label_field)
        n_classes = self.encoder.num_classes
        bad = [label for _, label in examples if not 0 <= label < n_classes]
        if bad:
            raise RecycleError(
                f"{self.encoder.task.data} ({self.splits[stage]}) has label {bad[0]} but the task has {n_classes} "
                f"verbalizers {list(self.encoder.task.verbalizers)}: give one verbalizer per class."
            )
        min_words = self.encoder.task.validation_min_words if stage == "validation" else 0
        if min_words:
            kept = [example for example in examples if len(example[0].split()) >= min_words]
            if not kept:
                raise RecycleError(
                    f"{self.encoder.task.data} ({self.splits[stage]}): no example has {min_words} words or more; "
                    "lower the task's validation_min_words (0 keeps every example)."
                )
            log.info(
                "%s/%s: deciding on the %d of %d examples with at least %d words (task.validation_min_words)",
                self.encoder.task.name, self.splits[stage], len(kept), len(examples), min_words,
            )  # fmt: skip
            examples = kept
        limit = self.limits[stage]
        if limit is not None and limit < len(examples):
            examples = random.Random(self.seed).sample(examples, limit)
        return examples

    def dataset(self, stage: str) -> TokenizedExamples:
        if stage not in self.datasets:
            examples = self.examples(stage)
            contexts = self.encoder.contexts([text for text, _ in examples])
            self.datasets[stage] = TokenizedExamples(contexts, [label for _, label in examples])
            log.info("%s/%s: %d examples", self.encoder.task.name, self.splits[stage], len(examples))
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        for split in wanted.get(stage or "", ("train", "validation", "test")):
            self.dataset(split)

    def _collate_train(self, items: list[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        return self.encoder.training_batch([c for _, c, _ in items], [y for _, _, y in items])

    def _collate_eval(self, items: list[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        batch = self.encoder.scoring_batch([c for _, c, _ in items])
        batch["index"] = torch.tensor([i for i, _, _ in items])
        batch["labels"] = torch.tensor([y for _, _, y in items])
        return batch

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        train = self.dataset("train")
        return DataLoader(
            train,
            batch_size=min(self.batch_size, len(train)) or 1,  # full batches only, but never none
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=self._collate_train,
            num_workers=self.num_workers,
        )

    def eval_dataloader(self, stage: str) -> DataLoader:
        return DataLoader(
            self.dataset(stage),
            batch_size=self.eval_batch_size,
            collate_fn=self._collate_eval,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
