"""Text-classification data for prompt tuning and rank classification.

Task data is read through Hugging Face ``datasets``: a directory of ``{split}.jsonl|json|
csv|tsv|parquet`` files, one such file (split deterministically into train, validation and
test), a directory written by ``save_to_disk``, or a hub dataset name. The task says which
column holds the text (or a template over several columns) and which the label (class
indices, or the class names the task lists). Examples are tokenised once in ``setup`` with
the model's :class:`TaskEncoder`; batches are built by the encoder so that training,
evaluation and pyfunc prediction see identical inputs.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mlflow_recycle.errors import RecycleError
from mlflow_recycle.prompted_lm import TaskEncoder
from mlflow_recycle.task import TaskSpec

log = logging.getLogger(__name__)

#: File suffixes read as split files, and the ``datasets`` builder for each.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SUFFIXES = tuple(BUILDERS)
SPLITS = ("train", "validation", "test")
#: Share of ``train`` held out as ``validation`` when the data has no validation split.
HELD_OUT_FRACTION = 0.1
#: How one data file with no splits is divided (seeded, so always the same rows).
FILE_SPLIT = {"train": 0.8, "validation": 0.1, "test": 0.1}


@contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars while we read (one per split would fill a log)."""
    import datasets as bars

    was_enabled = not bars.are_progress_bars_disabled()
    bars.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            bars.enable_progress_bars()


def _split_file(path: Path, split: str) -> Path | None:
    return next((path / f"{split}{s}" for s in SUFFIXES if (path / f"{split}{s}").is_file()), None)


def _load_file(path: Path, header: bool):
    import datasets

    options: dict[str, Any] = {}
    if path.suffix in (".csv", ".tsv"):
        options["delimiter"] = "\t" if path.suffix == ".tsv" else ","
        if path.suffix == ".tsv":
            options["quoting"] = 3  # csv.QUOTE_NONE: a quote in a sentence is text, not syntax
        if not header:  # columns are named by position: "0", "1", ...
            with path.open() as f:
                width = len(f.readline().rstrip("\n").split(options["delimiter"]))
            options.update(header=None, column_names=[str(i) for i in range(width)])
    with _quiet_datasets():
        return datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", **options)


def _seeded_order(n: int) -> list[int]:
    order = list(range(n))
    random.Random(0).shuffle(order)
    return order


#: Column added to a subset of a file's rows: each row's position in the file, for error messages.
ROW = "__row__"


def _subset(rows, indices: list[int]):
    return rows.add_column(ROW, list(range(len(rows)))).select(sorted(indices))


def _held_out(rows, split: str):
    """``validation``: a fixed, seeded slice of ``train``; ``train``: the rest (so they never overlap)."""
    order = _seeded_order(len(rows))
    cut = max(1, int(len(rows) * HELD_OUT_FRACTION))
    return _subset(rows, order[:cut] if split == "validation" else order[cut:])


def _file_split(rows, split: str, where: str):
    """One of train / validation / test of a single file: seeded shares (``FILE_SPLIT``), never overlapping."""
    if split not in FILE_SPLIT:
        raise RecycleError(f"{where} is one file, divided into {', '.join(FILE_SPLIT)}: there is no {split!r}.")
    order, n = _seeded_order(len(rows)), len(rows)
    bounds, start = {}, 0
    for name, share in FILE_SPLIT.items():
        stop = n if name == SPLITS[-1] else start + int(round(n * share))
        bounds[name] = (start, stop)
        start = stop
    begin, stop = bounds[split]
    log.info(
        "%s has no splits: %s is its seeded %d%% (%d of %d rows; train/validation/test %s)",
        where, split, round(100 * FILE_SPLIT[split]), stop - begin, n,
        "/".join(f"{share:.0%}" for share in FILE_SPLIT.values()),
    )  # fmt: skip
    return _subset(rows, order[begin:stop])


def _holds_out(split: str, splits) -> bool:
    """Whether ``split`` comes from ``train`` with a validation slice held out (no validation split)."""
    return split in ("train", "validation") and "validation" not in splits and "train" in splits


def _saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_rows(data: str, split: str, *, header: bool = True):
    """The rows of ``split`` (a ``datasets.Dataset``) and a description of where they came from."""
    import datasets

    path = Path(data).expanduser()
    if path.is_dir() and _saved(path):
        with _quiet_datasets():
            saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.Dataset):
            return _file_split(saved, split, str(path)), str(path)
        if _holds_out(split, saved):
            return _held_out(saved["train"], split), f"{path} [train]"
        if split in saved:
            return saved[split], f"{path} [{split}]"
        raise RecycleError(f"No {split!r} split in the saved dataset {path}: it has {', '.join(saved)}.")
    if path.is_dir():
        files = {name: file for name in SPLITS if (file := _split_file(path, name)) is not None}
        if _holds_out(split, files):
            if split == "validation":
                log.info("%s has no validation split: holding out %.0f%% of train", path, 100 * HELD_OUT_FRACTION)
            return _held_out(_load_file(files["train"], header), split), str(files["train"])
        file = _split_file(path, split)
        if file is None:
            raise RecycleError(
                f"No {split!r} split in {path}: expected one of {', '.join(split + s for s in SUFFIXES)}, "
                "or a directory written by datasets' save_to_disk."
            )
        return _load_file(file, header), str(file)
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise RecycleError(f"Cannot read {path}: task data files are {', '.join(SUFFIXES)}.")
        return _file_split(_load_file(path, header), split, str(path)), str(path)
    if data.startswith(("/", ".", "~")):
        raise RecycleError(f"Task data {data!r} does not exist: set task.data to a file or directory that does.")
    name, _, config = data.partition(":")  # "glue:sst2" or "stanfordnlp/sst2"
    with _quiet_datasets():
        try:
            splits = datasets.get_dataset_split_names(name, config or None)
            if _holds_out(split, splits):
                return _held_out(datasets.load_dataset(name, config or None, split="train"), split), name
            return datasets.load_dataset(name, config or None, split=split), name
        except (FileNotFoundError, ConnectionError, ValueError) as exc:
            raise RecycleError(
                f"Task data {data!r} is not a local file or directory, and the hub dataset could not be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): set task.data to a "
                "path, or a hub name (name or name:config) while online."
            ) from exc


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def read_examples(task: TaskSpec, split: str) -> list[tuple[str, int]]:
    """``(text, label)`` pairs of one split of ``task.data``, read with the task's fields.

    ``task.text_field`` is a column, or a template over columns (``"{premise} {hypothesis}"``);
    ``task.label_field`` holds class indices (``0..n-1``, as numbers or digits) or the class
    names ``task.labels`` lists (in verbalizer order). Bad data is one error naming the row
    and the setting to change.
    """
    rows, where = read_rows(task.data, split, header=task.header)
    columns = list(rows.column_names)
    template = task.text_field if "{" in task.text_field else None
    needed = _fields(template) if template else [task.text_field]
    missing = [c for c in (*needed, task.label_field) if c not in columns]
    if missing:
        raise RecycleError(
            f"{where} has columns {columns}; the task reads {missing[0]!r}: set task.text_field (a column, or "
            "a template over columns such as '{premise} {hypothesis}') and task.label_field"
            + ("" if task.header else " (a file without header names its columns 0, 1, ...)")
            + "."
        )
    names = {name: i for i, name in enumerate(task.labels)}
    folded = {name.casefold(): i for name, i in names.items()}
    n = len(task.labels)
    # whole columns as lists: iterating a `datasets` column reads it row by row (0.7 s for SST-2's train)
    table = rows.select_columns(list(dict.fromkeys([*needed, task.label_field, *([ROW] if ROW in columns else [])])))
    values = table.to_dict()
    columns_read = [values[c] for c in needed]
    if template:
        texts = [template.format(**dict(zip(needed, row, strict=True))) for row in zip(*columns_read, strict=True)]
    else:
        texts = columns_read[0]
    positions = values.get(ROW, range(len(rows)))
    examples = []
    for i, text, raw in zip(positions, texts, values[task.label_field], strict=True):
        label = _label(raw, names, folded, n)
        if label is None:
            raise RecycleError(
                f"{where} row {i} (data rows counted from 0): label {raw!r} is neither a class index "
                f"(0..{n - 1}) nor one of the task's labels {list(task.labels)}: set task.labels to the class "
                "names the data uses, in verbalizer order (or task.label_field to the column that holds the labels)."
            )
        if text is None:
            raise RecycleError(f"{where} row {i}: no text in {task.text_field!r}; drop the row or fill it in.")
        examples.append((str(text), label))
    return examples


def _label(raw: Any, names: dict[str, int], folded: dict[str, int], n: int) -> int | None:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer()):
        return int(raw) if 0 <= raw < n else None
    if isinstance(raw, str):
        value = raw.strip()
        if value in names or value.casefold() in folded:
            return names.get(value, folded.get(value.casefold()))
        if value.lstrip("-").isdigit():
            return int(value) if 0 <= int(value) < n else None
    return None


class TokenizedExamples(Dataset):
    """``(index, context ids, label)`` triples; the index survives shuffling and DDP sharding.

    A text is tokenised when its example is first drawn: a tuning run reads a few thousand of
    SST-2's 60,614 training examples, and tokenising all of them took 2 s a load. ``contexts``
    tokenises the rest in one batched call (evaluation sorts by length, so it needs them all).
    """

    def __init__(self, texts: list[str], labels: list[int], encode: Callable[[list[str]], list[list[int]]]) -> None:
        self.texts, self.labels, self._encode = texts, labels, encode
        self._contexts: list[list[int] | None] = [None] * len(texts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, list[int], int]:
        context = self._contexts[i]
        if context is None:
            context = self._contexts[i] = self._encode([self.texts[i]])[0]
        return i, context, self.labels[i]

    @property
    def contexts(self) -> list[list[int]]:
        missing = [i for i, context in enumerate(self._contexts) if context is None]
        for i, context in zip(missing, self._encode([self.texts[i] for i in missing]), strict=True):
            self._contexts[i] = context
        return self._contexts  # type: ignore[return-value]


class ByLength(Sampler[int]):
    """Examples in order of their context length: evaluation batches pad to lengths alike.

    A batch is padded to its longest row, so in a random order about a third of SST-2's
    evaluation positions were padding (1.67x the real ones at 64 a batch, 1.07x sorted); the
    scores are put back in example order (``RankClassificationModule``), so only the compute changes.
    """

    def __init__(self, dataset: TokenizedExamples) -> None:
        contexts = dataset.contexts
        self.order = sorted(range(len(dataset)), key=lambda i: len(contexts[i]))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def long_enough(task: TaskSpec, split: str, examples: list[tuple[str, int]], stage: str) -> list[tuple[str, int]]:
    """The examples of ``stage`` (``train`` or ``validation``) with at least the task's
    ``{stage}_min_words`` words (all of them when it is 0; test is never filtered)."""
    key = {"validation": "validation_min_words", "train": "train_min_words"}.get(stage)
    min_words = getattr(task, key) if key else 0
    if not min_words:
        return examples
    kept = [example for example in examples if len(example[0].split()) >= min_words]
    if not kept:
        raise RecycleError(
            f"{task.data} ({split}): no example has {min_words} words or more; "
            f"lower the task's {key} (0 keeps every example)."
        )
    log.info("%s/%s: %s on the %d of %d examples with at least %d words (task.%s)", task.name, split,
             "deciding" if stage == "validation" else "training", len(kept), len(examples), min_words, key)  # fmt: skip
    return kept


#: What a training batch may hold: LM rows (``lm``) or every class's scoring rows with labels (``classes``).
TRAIN_BATCHES = ("lm", "classes")


class TextClassificationDataModule(L.LightningDataModule):
    """Splits of one task tokenised for one model.

    Args:
        encoder: the model's :class:`TaskEncoder`; its task says where the data is and how to
            read it (:func:`read_examples`).
        batch_size / eval_batch_size: examples per training / evaluation batch.
        limit_train / limit_val / limit_test: use a seeded random subset of this many
            examples (for quick runs and for IMDB's 25,000 test reviews).
        seed: seeds the subsets and the shuffling.
        train_batch: what a training batch holds, for the tuning objective
            (``PromptTuningModule(objective=...)``, one ``prompt.objective`` setting for both):
            ``lm``, each context followed by its label's verbalizer (the LM loss); ``classes``,
            the rows that score every class, with the labels (the classification loss).
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
        seed: int = 0,
        num_workers: int = 0,
        train_batch: str = "lm",
    ) -> None:
        super().__init__()
        if train_batch not in TRAIN_BATCHES:
            raise RecycleError(
                f"Unknown training batch {train_batch!r}: choose one of {', '.join(TRAIN_BATCHES)} (prompt.objective)."
            )
        if encoder.task.data is None:
            raise RecycleError(
                f"Task {encoder.task.name!r} has no data location (task.data): set it to a directory or file."
            )
        self.encoder = encoder
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.splits = {"train": train_split, "validation": val_split, "test": test_split}
        self.limits = {"train": limit_train, "validation": limit_val, "test": limit_test}
        self.seed, self.num_workers, self.train_batch = seed, num_workers, train_batch
        self.datasets: dict[str, TokenizedExamples] = {}

    def examples(self, stage: str) -> list[tuple[str, int]]:
        """The (possibly subsampled) raw examples of ``stage`` (train / validation / test)."""
        task, split = self.encoder.task, self.splits[stage]
        examples = long_enough(task, split, read_examples(task, split), stage)
        limit = self.limits[stage]
        if limit is not None and limit < len(examples):
            examples = random.Random(self.seed).sample(examples, limit)
        return examples

    def dataset(self, stage: str) -> TokenizedExamples:
        if stage not in self.datasets:
            examples = self.examples(stage)
            texts, labels = [text for text, _ in examples], [label for _, label in examples]
            self.datasets[stage] = TokenizedExamples(texts, labels, self.encoder.contexts)
            log.info("%s/%s: %d examples", self.encoder.task.name, self.splits[stage], len(examples))
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        for split in wanted.get(stage or "", ("train", "validation", "test")):
            self.dataset(split)

    def _collate_train(self, items: list[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        if self.train_batch == "classes":
            return self._collate_eval(items)
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
            sampler=ByLength(self.dataset(stage)),
            batch_size=self.eval_batch_size,
            collate_fn=self._collate_eval,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
