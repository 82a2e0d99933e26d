"""What a soft prompt was trained to do: the text template and one verbalizer per class.

A prompt is only meaningful together with the exact template and label words it was
tuned with, so the task travels with the prompt (in its metadata and in MLflow) and the
same object drives training, evaluation and pyfunc prediction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RecycleError


@dataclass(frozen=True)
class TaskSpec:
    """A text-classification task as seen by a causal or seq2seq LM.

    Attributes:
        name: short identifier, e.g. ``"sst2"``.
        template: the input text, with ``{text}`` where the example goes, e.g.
            ``"Review: {text}\\nSentiment:"``. The model continues it with a verbalizer.
        verbalizers: one string per class, in label order (label ``i`` is
            ``verbalizers[i]``); each may tokenize to several tokens.
        data: where evaluation data lives (a local directory of ``{split}.jsonl`` files
            or a file), so that a prompt can be re-evaluated after recycling.
        labels: human-readable class names, defaulting to the stripped verbalizers.
        max_length: longest context in tokens; longer texts are cut on the text side so
            the template and the label always survive.
        truncation_side: ``"right"`` keeps the start of a long text, ``"left"`` its end.
        length_normalize: score a class by the mean instead of the sum of its verbalizer's
            token log-likelihoods (for verbalizers of different lengths).
        text_field: the column holding the text, or a template over columns
            (``"{premise} {hypothesis}"``).
        label_field: the column holding the label: a class index or one of ``labels``.
        header: CSV/TSV files have a header row; without one, columns are named ``0``, ``1``, ...
        validation_min_words: decide on validation examples of at least this many words
            (0: all), so that validation is drawn like test where a task's splits differ in
            kind: SST-2's validation is phrases from GLUE train, its test full sentences.
        train_min_words: train (and refine, on unlabelled inputs) on train examples of at
            least this many words (0: all): the same rule for the examples a prompt learns from.
    """

    name: str
    template: str
    verbalizers: tuple[str, ...]
    data: str | None = None
    labels: tuple[str, ...] = field(default=())
    max_length: int = 256
    truncation_side: str = "right"
    length_normalize: bool = False
    text_field: str = "text"
    label_field: str = "label"
    header: bool = True
    validation_min_words: int = 0
    train_min_words: int = 0

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise RecycleError(
                f"Task {self.name!r}: template {self.template!r} has no '{{text}}' placeholder. "
                "Add '{text}' where the input example should go, e.g. 'Review: {text}\\nSentiment:'."
            )
        if self.template.count("{text}") != 1:
            raise RecycleError(
                f"Task {self.name!r}: template {self.template!r} has '{{text}}' more than once; use it exactly once."
            )
        verbalizers = tuple(self.verbalizers)
        if len(verbalizers) < 2:
            raise RecycleError(
                f"Task {self.name!r}: needs at least two verbalizers (one per class), got {verbalizers!r}."
            )
        if any(not v.strip() for v in verbalizers):
            raise RecycleError(
                f"Task {self.name!r}: verbalizers {verbalizers!r} include an empty one; "
                "give every class a non-empty label word such as ' positive'."
            )
        if len(set(verbalizers)) != len(verbalizers):
            raise RecycleError(f"Task {self.name!r}: verbalizers {verbalizers!r} repeat; each class needs its own.")
        labels = tuple(self.labels) or tuple(v.strip() for v in verbalizers)
        if len(labels) != len(verbalizers):
            raise RecycleError(
                f"Task {self.name!r}: {len(labels)} label names for {len(verbalizers)} verbalizers; give one per class."
            )
        if self.truncation_side not in ("right", "left"):
            raise RecycleError(
                f"Task {self.name!r}: truncation_side must be 'right' or 'left', got {self.truncation_side!r}."
            )
        for key in ("validation_min_words", "train_min_words"):
            if getattr(self, key) < 0:
                raise RecycleError(
                    f"Task {self.name!r}: {key} must be 0 (every example) or more, got {getattr(self, key)}."
                )
        object.__setattr__(self, "verbalizers", verbalizers)
        object.__setattr__(self, "labels", labels)

    @property
    def prefix(self) -> str:
        """Template text before the example."""
        return self.template.split("{text}")[0]

    @property
    def suffix(self) -> str:
        """Template text after the example: the model's cue to answer."""
        return self.template.split("{text}")[1]

    def replace(self, **changes: Any) -> TaskSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
