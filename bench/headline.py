"""The headline of docs/benchmarks.md: per source -> target pair, what recycling gives and what it costs.

Reads the two benchmark CSVs and computes nothing new: per task of the paper's protocol and pair,

- training-free success: the share of the matrix's prompts (today's recipe) that ``linear``, the
  paper's map and the migration's, carries over the target's best baseline, and by 2 points;
- the migration's pass rate, under one policy's rows of ``bench/results/migration_policy.csv``;
- the gain kept on test: (migrated - best baseline) / (re-tuned - best baseline), the best
  baseline being max(zero-shot, random prompt) on the target (median and minimum over the prompts
  whose re-tuned prompt beats that baseline);
- compute as a share of one full re-tuning (counted FLOPs, median and worst);
- tuning from scratch to the same bar, over the migration's compute (median of
  ``scratch_flops_to_gate / policy_flops``), where the CSV has that column.

A cell with no rows reads "being measured".

    python bench/headline.py                       # the default policy's rows (the quality gate)
    python bench/headline.py --policy fast         # another policy's rows, by their label
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from docs_update import read_rows, update_section  # noqa: E402
from migration_policy import gain_kept, load_rows, with_references  # noqa: E402

#: source:target -> what changes (bench/recycling_matrix.py's pairs, the model update first).
PAIRS = {
    "small-a-early:small-a": "model update",
    "small-a:small-b": "another seed",
    "small-a:large": "larger",
    "large:small-a": "smaller",
    "small-a:small-c": "other tokenizer",
    "small-c:small-a": "other tokenizer",
}
#: Pairs with a real model (SmolLM2-135M, conf/model/smollm2-135m.yaml), listed where they have rows.
REAL_PAIRS = {
    "smollm2-135m:small-a": "real model → ours",
    "small-a:smollm2-135m": "ours → real model",
    "smollm2-135m:smollm2-135m-v2": "real model update",
}
TASKS = {"sst2_plain": "SST-2", "imdb_plain": "IMDB"}
#: The rows of the default policy (`policy=default`, the quality gate).
DEFAULT = "default"
MARGIN = 0.02
MEASURING = "being measured"


def number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def known(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def training_free(rows: list[dict]) -> str:
    """``linear``'s successes among a pair's prompts, and with the margin."""
    if not rows:
        return MEASURING
    best = [max(number(r["zero_shot_acc"]), number(r["random_prompt_acc"])) for r in rows]
    acc = [number(r["recycled_acc"]) for r in rows]
    over = sum(a > b for a, b in zip(acc, best, strict=True))
    margin = sum(a >= b + MARGIN for a, b in zip(acc, best, strict=True))
    return f"{over} of {len(rows)} ({margin})"


def migration(rows: list[dict]) -> list[str]:
    """Pass rate, gain kept, compute against re-tuning and scratch-to-bar over the migration's."""
    if not rows:
        return [MEASURING] * 4
    passed = sum(r["gate"] == "passed" for r in rows)
    kept = known(map(gain_kept, rows))
    compute = known(r["compute_fraction"] for r in rows)
    scratch = known(r.get("scratch_ratio", math.nan) for r in rows)
    return [
        f"{passed} of {len(rows)}",
        f"{statistics.median(kept):.2f} ({min(kept):.2f}) on {len(kept)}" if kept else MEASURING,
        f"{statistics.median(compute):.1%} ({max(compute):.0%})" if compute else MEASURING,
        f"{statistics.median(scratch):.1f}×" if scratch else MEASURING,
    ]


def of_pair(rows: list[dict], source: str, target: str) -> list[dict]:
    return [r for r in rows if r["source"] == source and r["target"] == target]


def headline(matrix: list[dict], policy: list[dict], label: str) -> str:
    lines = []
    for task, name in TASKS.items():
        linear = [r for r in matrix if r["task"] == task and r["objective"] == "classes" and r["recycler"] == "linear"]
        migrated = [r for r in policy if r["task"] == task and r["objective"] == "classes" and r["policy"] == label]
        n_test = {r["n_test"] for r in migrated} or {math.nan}
        tests = known(r["test_accuracy"] for r in migrated) or [0.75]
        p, n = statistics.fmean(tests), max(n_test)
        se = f"{100 * (p * (1 - p) / n) ** 0.5:.1f} points" if n == n else "—"
        lines += [
            f"**{name}** (test: {n:.0f} examples; one standard error of an accuracy near {p:.0%}: {se})"
            if n == n
            else f"**{name}** (no rows of this policy yet)",
            "",
            "| pair | what changes | training-free: `linear` passes (by 2 points) | migration passes "
            "| gain kept on test: median (min) | compute against re-tuning: median (worst) "
            "| scratch to the same bar ÷ migration |",
            "|---|---|---|---|---|---|---|",
        ]
        real = {pair: change for pair, change in REAL_PAIRS.items() if of_pair(migrated, *pair.split(":"))}
        for pair, change in {**PAIRS, **real}.items():
            source, target = pair.split(":")
            cells = [training_free(of_pair(linear, source, target)), *migration(of_pair(migrated, source, target))]
            lines.append(f"| {source} → {target} | {change} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=DEFAULT, help="the label of the policy's rows (the CSV's `policy` column)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="directory of the two CSVs")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--print-only", action="store_true", help="print the section, leave the docs alone")
    args = parser.parse_args()
    results = Path(args.results)
    matrix = read_rows(results / "recycling_matrix.csv")
    policy = with_references(load_rows(results / "migration_policy.csv"))
    note = (
        f"_Generated by `python bench/headline.py` from `bench/results/*.csv`: the matrix's `linear` rows "
        f"and the migration rows labelled `{args.policy}`; prompts of today's recipe (3 inits × 3 seeds "
        f"a pair, where run); 2-core x86_64 CPU._"
    )
    body = f"{note}\n\n{headline(matrix, policy, args.policy)}"
    print(body)
    if not args.print_only:
        update_section(Path(args.docs), "headline", body)


if __name__ == "__main__":
    main()
