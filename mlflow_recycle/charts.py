"""The recycling results chart: accuracies side by side, the deciding baseline as a line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: charts are written to files and logged to MLflow
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = {"subject": "#4c72b0", "other": "#dd8452", "reference": "#8172b3", "baseline": "#9aa5b1"}
NAMES = {"subject": "judged", "other": "on another model", "reference": "upper bound", "baseline": "baseline"}


def accuracy_chart(
    accuracies: Mapping[str, float],
    *,
    errors: Mapping[str, float] | None = None,
    error_meaning: str = "",
    baseline: float | None = None,
    title: str = "",
    subtitle: str = "",
    subjects: tuple[str, ...] = ("recycled",),
    other_model: tuple[str, ...] = ("source",),
    references: tuple[str, ...] = ("retuned",),
) -> Figure:
    """A bar per entry of ``accuracies`` (label -> accuracy) with the best baseline as a dashed line.

    Bars whose label contains one of ``subjects`` are the ones judged (blue); ``other_model``
    bars were measured on another model (orange, hatched), ``references`` are upper bounds
    (purple: a prompt re-tuned on the target), the rest are baselines (grey).
    The axis starts near the lowest bar, so the few points that decide a verdict are visible,
    and the gap of each subject to the baseline is written on its bar. ``errors`` draws
    error bars, explained by ``error_meaning`` under the title; the legend sits outside the bars.
    """
    labels, values = list(accuracies), list(accuracies.values())
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2.5, 4.4), layout="constrained")

    def kind(label: str) -> str:
        for name, marks in (("subject", subjects), ("other", other_model), ("reference", references)):
            if any(mark in label for mark in marks):
                return name
        return "baseline"

    kinds = [kind(label) for label in labels]
    spread = [(errors or {}).get(k, float("nan")) for k in labels]  # NaN: no error bar
    bars = ax.bar(
        labels,
        values,
        color=[COLORS[k] for k in kinds],
        hatch=["//" if k == "other" else "" for k in kinds],
        edgecolor="white",
        yerr=spread,
        capsize=4,
    )
    texts = []
    for value, kind in zip(values, kinds, strict=True):
        gap = f"\n{100 * (value - baseline):+.1f} pts" if baseline is not None and kind == "subject" else ""
        texts.append(f"{value:.1%}{gap}")
    ax.bar_label(bars, labels=texts, padding=3, fontsize=9)
    _legend(fig, ax, kinds, baseline)
    finite = [v for v in values if v == v]
    low = max(0.0, (min(finite) if finite else 0.0) - 0.1)
    ax.set_ylim(int(low * 10) / 10, min(1.0, max(finite, default=1.0) + 0.12))
    ax.set_ylabel("accuracy")
    ax.set_title("\n".join(filter(None, [title, subtitle])), fontsize=10)
    ax.tick_params(axis="x", labelrotation=15)
    if error_meaning:
        ax.annotate(error_meaning, (0, 0), xycoords="figure fraction", xytext=(4, 4), textcoords="offset points",
                    fontsize=8, color="#555555")  # fmt: skip
    return fig


def _legend(fig: Figure, ax, kinds: Sequence[str], baseline: float | None) -> None:
    """A legend entry per kind of bar drawn, and the best baseline as a dashed line, outside the bars."""
    shown = [k for k in COLORS if k in kinds]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in shown]
    legend = [NAMES[k] for k in shown]
    if baseline is not None:
        handles.append(ax.axhline(baseline, color="#c44e52", linestyle="--", linewidth=1))
        legend.append(f"best baseline {baseline:.1%}")
    fig.legend(handles, legend, loc="outside right upper", fontsize=8, frameon=False)


def confusion_chart(confusion: Sequence[Sequence[int]], classes: Sequence[str], *, title: str = "") -> Figure:
    """Counts of true class (rows) × predicted class (columns), each cell annotated: a prompt that
    collapses onto one class shows as one full column."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.2, 1.0 * n + 1.6), layout="constrained")
    ax.imshow(confusion, cmap="Blues")
    peak = max((max(row) for row in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return fig
