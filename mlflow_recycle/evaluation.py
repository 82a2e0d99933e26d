"""Evaluating prompts on a model against that model's own baselines, and the success gate.

A recycled prompt is only worth anything if it beats what the target model does without
it: the template alone (zero-shot) and a random-token prompt of the same length (any
in-vocabulary prefix). The main job and the migration worker both judge prompts here.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch

from lightning_modules import RankClassificationModule, TextClassificationDataModule, TrainerFactory
from lightning_modules.modules import confusion_counts, macro_f1_of

from .anchors import embedding_table
from .errors import RecycleError
from .models import LoadedModel
from .prompt_init import sample_vocab_rows
from .prompted_lm import TaskEncoder
from .task import TaskSpec

log = logging.getLogger(__name__)
# Lightning announces its hardware and tips for every Trainer; evaluations create many.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

SPLITS = ("validation", "test")


def task_data(
    side: LoadedModel,
    spec: TaskSpec,
    *,
    prompt_length: int,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    datamodule: Callable[..., TextClassificationDataModule] | None = None,
) -> TextClassificationDataModule:
    """The task tokenised for ``side``, checked against its context window.

    ``datamodule``: builds the data module from the encoder (``instantiate(cfg.data)``, whose
    config holds the batch sizes, limits and seed); None: these arguments' own."""
    needed = spec.max_length + prompt_length
    if side.max_positions is not None and needed > side.max_positions:
        raise RecycleError(
            f"task max_length={spec.max_length} plus prompt length {prompt_length} is {needed} positions, "
            f"more than {side.name} supports ({side.max_positions}): lower the task's max_length."
        )
    encoder = TaskEncoder(side.tokenizer, spec, seq2seq=side.seq2seq)
    if datamodule is not None:
        return datamodule(encoder)
    return TextClassificationDataModule(
        encoder,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        limit_train=limit_train,
        limit_val=limit_val,
        limit_test=limit_test,
        seed=seed,
    )


@dataclass(frozen=True)
class Baselines:
    """A model's accuracy without a trained prompt, per split (and on how many examples)."""

    zero_shot: dict[str, float]
    random_prompt: dict[str, float]
    random_prompt_std: dict[str, float]
    examples: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # one standard error of the best, in its metric

    def best(self, split: str) -> float:
        return max(self.zero_shot[split], self.random_prompt[split])

    def standard_error(self, split: str) -> float:
        """One standard error of the best baseline on ``split``: as measured in its metric
        (:meth:`ClassReport.standard_error`), else an accuracy's sqrt(p(1 - p) / n)."""
        if split in self.errors:
            return self.errors[split]
        n = self.examples.get(split)
        if not n:
            raise RecycleError(f"No example count recorded for the {split!r} baselines: cannot give a standard error.")
        p = min(max(self.best(split), 0.0), 1.0)
        return math.sqrt(p * (1 - p) / n)

    @classmethod
    def merge(cls, parts: Sequence[Baselines]) -> Baselines:
        """One record of baselines measured split by split."""
        return cls(
            zero_shot={k: v for p in parts for k, v in p.zero_shot.items()},
            random_prompt={k: v for p in parts for k, v in p.random_prompt.items()},
            random_prompt_std={k: v for p in parts for k, v in p.random_prompt_std.items()},
            examples={k: v for p in parts for k, v in p.examples.items()},
            errors={k: v for p in parts for k, v in p.errors.items()},
        )

    def beaten_by(self, accuracy: float, split: str) -> bool:
        """Strictly better than both baselines (the paper's success criterion)."""
        return accuracy > self.best(split)


def verdict_metrics(
    accuracies: dict[str, dict[str, float]], baselines: Baselines, subject: str, splits: Sequence[str]
) -> dict[str, float]:
    """Per split: each prompt's accuracy, the baselines, ``success`` of ``subject`` (beats the
    best baseline) and, when a ``retuned`` prompt beats the baselines, ``recovery`` (the share
    of its gain the subject keeps). ``accuracies[label][split]``; the job and the migration
    report with this one function."""
    accuracies = {**accuracies, "zero_shot": baselines.zero_shot, "random_prompt": baselines.random_prompt}
    metrics: dict[str, float] = {}
    for split in splits:
        for label, per_split in accuracies.items():
            if split in per_split:
                metrics[f"{split}/{label}_accuracy"] = per_split[split]
        best = baselines.best(split)
        metrics[f"{split}/random_prompt_std"] = baselines.random_prompt_std[split]
        metrics[f"{split}/best_baseline_accuracy"] = best
        metrics[f"{split}/success"] = float(baselines.beaten_by(accuracies[subject][split], split))
        if "retuned" in accuracies and accuracies["retuned"][split] > best:
            gap = accuracies["retuned"][split] - best
            metrics[f"{split}/recovery"] = (accuracies[subject][split] - best) / gap
    return metrics


@dataclass(frozen=True)
class ClassReport:
    """One prompt on one split, class by class: what accuracy alone hides on a multi-class task
    (a prompt that predicts one class for every text shows as one recall near 1, the others 0)."""

    accuracy: float
    classes: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]  # [true class][predicted class] counts

    @classmethod
    def of(cls, labels: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str]) -> ClassReport:
        counts = confusion_counts(labels, predictions, len(classes))
        accuracy = float((labels == predictions).float().mean()) if len(labels) else float("nan")
        return cls(accuracy, tuple(classes), tuple(tuple(int(c) for c in row) for row in counts.tolist()))

    @property
    def examples(self) -> int:
        return sum(map(sum, self.confusion))

    def recall(self) -> dict[str, float]:
        return {
            c: row[i] / sum(row) if sum(row) else float("nan")
            for i, (c, row) in enumerate(zip(self.classes, self.confusion, strict=False))
        }

    def predicted_share(self) -> dict[str, float]:
        total = self.examples or 1
        return {c: sum(row[i] for row in self.confusion) / total for i, c in enumerate(self.classes)}

    def standard_error(self, metric: str, draws: int = 200) -> float:
        """One standard error of ``metric`` on these examples: sqrt(p(1 - p) / n) for accuracy; for
        macro-F1, the spread of a seeded bootstrap of the examples (resampled from the confusion counts)."""
        n = self.examples
        if not n:
            return float("nan")
        if metric == "accuracy":
            return math.sqrt(self.accuracy * (1 - self.accuracy) / n)
        k = len(self.classes)
        cells = torch.tensor(self.confusion, dtype=torch.float64).flatten()
        generator = torch.Generator().manual_seed(0)
        samples = torch.multinomial(cells / n, n * draws, replacement=True, generator=generator).view(draws, n)
        values = [macro_f1_of(torch.bincount(sample, minlength=k * k).view(k, k)) for sample in samples]
        return statistics.pstdev(values)

    def value(self, metric: str) -> float:
        """``accuracy`` or ``macro_f1``."""
        return self.accuracy if metric == "accuracy" else self.macro_f1()

    def macro_f1(self) -> float:
        return macro_f1_of(torch.tensor(self.confusion)) if self.confusion else float("nan")

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/recall/<class>``, ``{prefix}/predicted_share/<class>`` and ``{prefix}/macro_f1``."""
        out = {f"{prefix}/macro_f1": self.macro_f1()}
        out.update({f"{prefix}/recall/{_safe(c)}": v for c, v in self.recall().items()})
        out.update({f"{prefix}/predicted_share/{_safe(c)}": v for c, v in self.predicted_share().items()})
        return out


def _safe(name: str) -> str:
    """A class name as an MLflow metric key part (``Sci/Tech`` -> ``Sci_Tech``)."""
    return "".join(ch if ch.isalnum() or ch in "_-. " else "_" for ch in name).strip() or "class"


@dataclass
class Evaluator:
    """Rank-classification evaluations, each on a fresh Lightning trainer built from ``trainer`` config.

    Args:
        trainer: builds a Lightning trainer (``instantiate(cfg.trainer, _partial_=True)``).
        splits: ``validation`` and/or ``test``.
        random_draws: random-token prompts averaged for the baseline.
        seed: seeds the random-token draws.
        prompts_per_pass: how many prompts :meth:`reports` scores in one pass through the model.
    """

    trainer: TrainerFactory
    splits: Sequence[str] = ("test",)
    random_draws: int = 3
    seed: int = 0
    metric: str = "accuracy"  # what score() and baselines() measure
    prompts_per_pass: int = 1

    def __post_init__(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise RecycleError(f"Evaluation splits may be {' and '.join(SPLITS)}, got {list(self.splits)}.")

    def accuracy(
        self, side: LoadedModel, data: TextClassificationDataModule, prompt: torch.Tensor | None, name: str
    ) -> dict[str, float]:
        """Accuracy of ``prompt`` (None: zero-shot) on each split."""
        return {split: report.accuracy for split, report in self.report(side, data, prompt, name).items()}

    def score(
        self,
        side: LoadedModel,
        data: TextClassificationDataModule,
        prompt: torch.Tensor | None,
        name: str,
    ) -> dict[str, float]:
        """``metric`` of ``prompt`` (None: zero-shot) on each split."""
        reports = self.report(side, data, prompt, name)
        return {split: report.value(self.metric) for split, report in reports.items()}

    def report(
        self,
        side: LoadedModel,
        data: TextClassificationDataModule,
        prompt: torch.Tensor | None,
        name: str,
    ) -> dict[str, ClassReport]:
        """``prompt`` (None: zero-shot) on each split, class by class."""
        return self._passes(side, data, prompt, name)[0]

    def reports(
        self, side: LoadedModel, data: TextClassificationDataModule, prompts: Sequence[torch.Tensor], name: str
    ) -> list[dict[str, ClassReport]]:
        """Each of ``prompts`` on each split, as :meth:`report` gives it: ``prompts_per_pass`` prompts of one
        shape are scored in one pass, each row of a batch carrying its own prompt."""
        out: list[dict[str, ClassReport]] = [{} for _ in prompts]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_shape.setdefault(tuple(prompt.shape), []).append(i)
        size = max(self.prompts_per_pass, 1)
        for same in by_shape.values():
            for start in range(0, len(same), size):
                chunk = same[start : start + size]
                stack = torch.stack([prompts[i] for i in chunk]) if len(chunk) > 1 else prompts[chunk[0]]
                for i, reports in zip(chunk, self._passes(side, data, stack, name), strict=True):
                    out[i] = reports
        return out

    def _passes(
        self, side: LoadedModel, data: TextClassificationDataModule, prompt: torch.Tensor | None, name: str
    ) -> list[dict[str, ClassReport]]:
        """One pass per split of ``prompt`` (one, none or a ``[K, length, dim]`` stack): each prompt's reports."""
        module = RankClassificationModule(
            side.model, prompt, length_normalize=data.encoder.task.length_normalize, name=name
        )
        reports: list[dict[str, ClassReport]] = [{} for _ in range(module.stack or 1)]
        classes = data.encoder.task.labels
        for split in self.splits:
            # every example of the split, whatever the trainer config limits for training
            trainer: L.Trainer = self.trainer(logger=False, limit_val_batches=1.0, limit_test_batches=1.0)
            run = trainer.test if split == "test" else trainer.validate
            run(module, datamodule=data, verbose=False)
            result = module.results[split]
            results = result.get("prompts", [{}] * len(reports)) if module.stack else [result]
            for report, one in zip(reports, results, strict=True):
                empty = ClassReport(float("nan"), tuple(classes), ())  # an empty split
                report[split] = ClassReport.of(one["labels"], one["predictions"], classes) if "labels" in one else empty
            accuracies = [report[split].accuracy for report in reports]
            what = (
                f"{accuracies[0]:.4f}"
                if len(reports) == 1
                else f"{len(reports)} prompts in one pass, mean {statistics.fmean(accuracies):.4f}"
            )
            log.info("%s on %s/%s: %s", name, side.name, split, what)
        return reports

    def baselines(self, side: LoadedModel, data: TextClassificationDataModule, prompt_length: int) -> Baselines:
        """Zero-shot and the mean (and spread) of random-token prompts of ``prompt_length`` rows, in ``metric``."""
        reports = self.report(side, data, None, "zero_shot")
        zero_shot = {split: report.value(self.metric) for split, report in reports.items()}
        table = embedding_table(side.model)
        rows = []
        for draw in range(self.random_draws):
            generator = torch.Generator().manual_seed(self.seed + 1000 + draw)
            rows.append(sample_vocab_rows(table, prompt_length, generator, exclude_ids=side.tokenizer.all_special_ids))
        draws = self.reports(side, data, rows, "random_prompt")
        random_prompt = {s: statistics.fmean(d[s].value(self.metric) for d in draws) for s in self.splits}
        errors = {}  # macro-F1's: zero-shot's or a random draw's bootstrap (accuracy's has a closed form)
        for s in self.splits if self.metric != "accuracy" else ():
            best = reports[s] if zero_shot[s] >= random_prompt[s] or not draws else draws[0][s]
            errors[s] = best.standard_error(self.metric)
        return Baselines(
            zero_shot=zero_shot,
            random_prompt=random_prompt,
            random_prompt_std={s: statistics.pstdev(d[s].value(self.metric) for d in draws) for s in self.splits},
            examples={split: report.examples for split, report in reports.items()},
            errors=errors,
        )
