"""The recycling results chart: accuracies side by side, baselines dashed."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: charts are written to files and logged to MLflow
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def accuracy_chart(
    accuracies: Mapping[str, float],
    *,
    errors: Mapping[str, float] | None = None,
    baseline: float | None = None,
    title: str = "",
) -> Figure:
    """A bar per entry of ``accuracies`` (label -> accuracy), with the best baseline as a line."""
    labels, values = list(accuracies), list(accuracies.values())
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 4), layout="constrained")
    colors = ["#4c72b0" if "recycled" in label else "#9aa5b1" for label in labels]
    spread = [(errors or {}).get(k, float("nan")) for k in labels]  # NaN: no error bar
    bars = ax.bar(labels, values, color=colors, yerr=spread, capsize=4)
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], padding=3)
    if baseline is not None:
        ax.axhline(baseline, color="#c44e52", linestyle="--", linewidth=1, label=f"best baseline {baseline:.1%}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=15)
    return fig
