"""What the benchmarks share: their logging, their sections of docs/benchmarks.md, their worker processes."""

from __future__ import annotations

import csv
import fcntl
import logging
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any


def bench_logging() -> None:
    """INFO lines from the benchmark and the product; the libraries' chatter only when it matters."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "mlflow", "lightning_modules", "mlflow_recycle.evaluation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("lightning_modules.callbacks").setLevel(logging.INFO)  # ProgressLog: a long tuning's progress


def bench_machine() -> str:
    """This machine as a generated section names it: architecture, cores, torch, date."""
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def update_section(docs: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    docs.write_text(f"{before}{start}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}")


def lock_csv(path: Path, script: str):
    """Hold an exclusive lock beside the CSV at ``path`` (``.<name>.lock``) for as long as the
    returned file stays open: each run rewrites its CSV from the rows it read at start, so two
    runs on one CSV would lose each other's rows. A second run exits saying what to do."""
    lock = path.with_name(f".{path.stem}.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        sys.exit(f"Another {script} run is writing {path}: wait for it, or pass another --out.")
    return lock


def read_rows(path: Path) -> list[dict]:
    """The rows of a benchmark CSV as strings, with the columns added since the first rows were
    written filled in: ``device`` (rows from before it were all measured on the CPU) and
    ``objective`` (prompts tuned on the LM loss, the recipe before ``classes``)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["device"] = row.get("device") or "cpu"
        row["objective"] = row.get("objective") or "lm"
    return rows


def write_rows(path: Path, columns: list[str], kept: Iterable[dict], found: Iterable[dict]) -> Iterator[dict]:
    """Rewrite the CSV at ``path``: the ``kept`` rows at once, then each row of ``found`` as it
    comes, yielded once it is on disk. A run killed at any point loses no row it had written."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        f.flush()
        for row in found:
            writer.writerow(row)
            f.flush()
            yield row


def rows_by_device(rows: Iterable[dict]) -> str:
    """``cpu 12, NVIDIA H200 25``: how many of a benchmark's rows each device produced."""
    counts = Counter(row["device"] for row in rows)
    return ", ".join(f"{device} {n}" for device, n in sorted(counts.items()))


def in_processes(
    work: Callable[[Any], Any], items: Iterable, workers: int, start: Callable[..., None], *args: Any
) -> Iterator[Any]:
    """``work(item)`` for each item, yielded as each finishes, in ``workers`` spawned processes
    (each first runs ``start(*args)``; spawned, since CUDA cannot be forked). Small models leave
    a GPU mostly idle between one process's kernels, so several processes share it well; each
    gets its share of the CPU cores as torch threads, unless ``OMP_NUM_THREADS`` says otherwise.
    An item that fails is logged and the others finish; then the call raises, naming it. A
    worker whose parent is gone (killed, not interrupted) exits too, rather than go on alone."""
    threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
    failed = []
    context = multiprocessing.get_context("spawn")
    initargs = (os.getpid(), threads, start, args)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=initargs) as pool:
        futures = {pool.submit(work, item): item for item in items}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception:  # one item's failure is told now; the others' work goes on and is kept
                logging.getLogger("bench").exception("Failed: %s", futures[future])
                failed.append(futures[future])
                continue
            yield result
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} items failed (logged above), the first: {failed[0]}")


def _start(parent: int, threads: str, start: Callable[..., None], args: tuple) -> None:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    bench_logging()
    start(*args)


def _exit_with(parent: int, every: float = 5.0) -> None:
    """End this worker once ``parent`` is no longer its parent (it died and the worker was re-parented)."""
    while os.getppid() == parent:
        time.sleep(every)
    logging.getLogger("bench").warning("The benchmark process %d is gone: worker %d stops", parent, os.getpid())
    os._exit(1)
