"""Write a benchmark's generated section into docs/benchmarks.md, between its markers."""

from __future__ import annotations

import logging
from pathlib import Path


def bench_logging() -> None:
    """INFO lines from the benchmark and the product; the libraries' chatter only when it matters."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "mlflow", "lightning_modules", "mlflow_recycle.evaluation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def update_section(docs: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    docs.write_text(f"{before}{start}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}")
