"""The README's and docs' examples, run as a user runs them: each page's blocks in order, in one store.

Every ```python and ```bash block of README.md and docs/*.md is run, unless the line just before its
fence is `<!-- not run: why -->` (never run) or `<!-- slow: why -->` (run only by `pytest -m slow`).

Other blocks (yaml, csv, text) are shown, not run. Each block runs in a subprocess of its own (a
python block with `python -c`, a bash block with `bash -e -o pipefail`), with the working directory
a temporary directory that links to the checkout's `assets/`, `bench/`, `conf/`, `MLproject` and
`.venv/`: `sqlite:///mlflow.db`, `mlruns/` and everything else an example writes land there, never
in the checkout. `HOME` is temporary too, and no `MLFLOW_*` variable is passed on, so an example
names its tracking store itself, as a user's must. The default run (not slow) runs each page's
unmarked blocks in a fresh directory, under a minute on 2 cores. `-m slow` runs each page that
has slow blocks, all its unmarked and slow blocks in order, in one directory shared as a user's
checkout is, after the page it builds on (FOLLOWS): docs/migration.md's "Running one by hand"
finds the store the README's main job and migration left.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
LINKED = ["assets", "bench", "conf", "MLproject", "python_env.yaml", ".venv"]  # what examples read
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKER = re.compile(r"<!--\s*(not run|slow):\s*(\S.*?)\s*-->")
MPLCONFIGDIR = tempfile.mkdtemp(prefix="mlflow-recycle-examples-mpl-")  # matplotlib's font cache, built once
STALL_SECONDS = 900  # a block is stopped after this long without a line of output, not on the wall clock


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str  # python or bash
    code: str
    tier: str  # "default", "slow" or "not run"
    reason: str

    @property
    def name(self) -> str:
        first = next((s.strip() for s in self.code.splitlines() if s.strip()), "")
        return f"{self.page}:{self.line} `{first[:70]}`"


def blocks(page: str) -> list[Block]:
    """The page's ```python and ```bash blocks, with the marker on the line before each fence."""
    found: list[Block] = []
    lines = (REPO / page).read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), len(lines))
        language = LANGUAGES.get(fence.group(2).lower())
        if language:
            before = lines[i - 1].strip() if i else ""
            marker = MARKER.fullmatch(before)
            if before.startswith("<!--") and not marker:
                raise ValueError(f"{page}:{i}: {before!r} is not `<!-- not run: why -->` or `<!-- slow: why -->`")
            tier, reason = (marker.group(1), marker.group(2)) if marker else ("default", "")
            found.append(Block(page, i + 1, language, "\n".join(lines[i + 1 : end]) + "\n", tier, reason))
        i = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


# What some examples must print or leave behind, as their pages say. Keyed by the page and a
# snippet of the block; test_checks_name_existing_blocks keeps the keys in step with the docs.
def _prints(*patterns: str) -> Callable[[Path, str], None]:
    def check(work: Path, output: str) -> None:
        for pattern in patterns:
            assert re.search(pattern, output, re.MULTILINE), f"expected {pattern!r} in its output"

    return check


def _recycled_adapter(work: Path, output: str) -> None:
    assert {"adapter_config.json", "mlflow_recycle.json"} <= {p.name for p in (work / "recycled").iterdir()}


PREDICTION = r"label\s+label_name\s+score_bad\s+score_great\n0\s+[01]\s+(bad|great)\s"
CHECKS: dict[tuple[str, str], Callable[[Path, str], None]] = {
    ("README.md", "python -m mlflow_recycle "): _prints(
        r"main job on sst2_plain: small-a-early → small-a",
        r"verdict on test: (success|failure)",
        r"source_prompt: models:/imdb-lm-sst2_plain-prompt/1",
    ),
    ("README.md", "print(base_of(uri))"): _prints(r"\('imdb-lm', '[12]'\)", r"\('sentiment', \d+\)", PREDICTION),
    ("README.md", "mlflow-recycle migrate imdb-lm 2"): _prints(r"\d+ new prompt versions for imdb-lm v2 \(from v1\)"),
    ("docs/flavor.md", "print(base_of(uri))"): _prints(r"\('imdb-lm', '[12]'\)", PREDICTION),
    ("docs/configuration.md", "fit_recycler"): _recycled_adapter,
    ("docs/migration.md", "--from-version 1 -o policy=fast"): _prints(
        r"models:/imdb-lm-sst2_plain-prompt/\d+ -> models:/imdb-lm-sst2_plain-prompt/\d+: \w+ at \w+"
    ),
    ("docs/migration.md", "mlflow-recycle hook serve"): _prints(  # the prompt tuned in step 4, on version 2
        r'"source":"models:/imdb-lm-sst2_plain-prompt/1","target":"models:/imdb-lm-sst2_plain-prompt/2"',
        r"^\[\('imdb-lm-sst2_plain-prompt', '?2'?, '(passed|degraded|failed)'\)\]$",
    ),
}

# Appended to a bash block, in the same shell: what the page tells the user to do next.
EPILOGUES: dict[tuple[str, str], str] = {
    # "Step 6 shows the job `done` once the migration has finished, then the prompt you tuned in
    # step 4 on the new base": ask again until no job is queued or running, then list the prompts.
    ("docs/migration.md", "mlflow-recycle hook serve"): """
echo '--- the test: step 6 again, once the job for version 2 has finished and none is queued or running'
until curl -s -H "Authorization: Bearer $MLFLOW_RECYCLE_JOBS_TOKEN" 127.0.0.1:5050/jobs | python -c "
import json, sys
jobs = json.load(sys.stdin)
finished = any(str(j['to_version']) == '2' and j['status'] in ('done', 'failed') for j in jobs)
sys.exit(not finished or any(j['status'] in ('queued', 'running') for j in jobs))"
do curl -sf 127.0.0.1:5050/health > /dev/null || { echo 'the receiver stopped'; exit 1; }; sleep 5; done
curl -s -H "Authorization: Bearer $MLFLOW_RECYCLE_JOBS_TOKEN" 127.0.0.1:5050/jobs; echo
python -c "from mlflow_recycle.registry import prompts_for as p; \
  print([(v.name, v.version, v.tags['mlflow_recycle.gate']) for v in p('imdb-lm', 2)])"
""",
}

# Ports a block binds as written; it cannot run while another process holds them.
PORTS = {("docs/migration.md", "mlflow-recycle hook serve"): (5000, 5050)}


def _keyed(table: dict, block: Block):
    return next(
        (value for (page, snippet), value in table.items() if page == block.page and snippet in block.code), None
    )


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "XDG_", "VIRTUAL_ENV"))}
    if "MLFLOW_RECYCLE_SHARED" in os.environ:  # where ../shared is, not a setting of the examples
        env["MLFLOW_RECYCLE_SHARED"] = os.environ["MLFLOW_RECYCLE_SHARED"]
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the quick start's venv
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
        MPLCONFIGDIR=MPLCONFIGDIR,
    )
    return env


def workdir(root: Path) -> Path:
    """A directory that reads like the checkout's root to the examples but keeps what they write."""
    work = root / "checkout"
    (root / "home").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    for name in LINKED:
        if (REPO / name).exists() and not (work / name).exists():
            (work / name).symlink_to(REPO / name)
    return work


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_block(block: Block, work: Path) -> None:
    """Run one block in ``work``; fail naming the page, the block's first line and the output's tail."""
    taken = [port for port in _keyed(PORTS, block) or () if _port_taken(port)]
    if taken:
        pytest.skip(f"{block.name} binds ports {taken}, which another process holds here")
    if block.language == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.code + (_keyed(EPILOGUES, block) or "")]
    log = work.parent / f"{Path(block.page).stem}-{block.line}.log"
    with log.open("w") as out:
        # a session of its own, so that servers a block leaves in the background are stopped with it
        process = subprocess.Popen(
            command, cwd=work, env=_env(work.parent / "home"), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            size, heard = -1, time.monotonic()
            while process.poll() is None:
                if log.stat().st_size != size:
                    size, heard = log.stat().st_size, time.monotonic()
                elif time.monotonic() - heard > STALL_SECONDS:
                    break
                time.sleep(0.5)
        finally:
            _stop_group(process)
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        pytest.fail(f"{block.name} exited {process.returncode}:\n{output[-4000:]}", pytrace=False)
    check = _keyed(CHECKS, block)
    if check:
        try:
            check(work, output)
        except AssertionError as exc:
            pytest.fail(f"{block.name}: {exc}:\n{output[-4000:]}", pytrace=False)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    process.wait()


def _params(select: Callable[[Block], bool], marks=()):
    pages = [page for page in PAGES if any(select(b) for b in ALL if b.page == page)]
    return [pytest.param(page, id=page, marks=marks) for page in pages]


@pytest.mark.parametrize("page", _params(lambda b: b.tier == "default"))
def test_page_examples_run(page, tmp_path):
    work = workdir(tmp_path)
    for block in (b for b in ALL if b.page == page and b.tier == "default"):
        run_block(block, work)


@pytest.fixture(scope="module")
def users_checkout(tmp_path_factory):
    """One directory for the whole slow walk: each page finds what the pages before it left."""
    return workdir(tmp_path_factory.mktemp("users-checkout")), set()


# The pages a slow page's examples build on, run first in the same directory if they have not been.
FOLLOWS = {"docs/migration.md": "README.md"}  # "Running one by hand" migrates the quick start's prompts


SLOW = [pytest.mark.slow, pytest.mark.timeout(3600)]  # setup.cfg's 900 s is short for a page that tunes and migrates


@pytest.mark.parametrize("page", _params(lambda b: b.tier == "slow", marks=SLOW))
def test_page_examples_run_in_order_after_the_pages_before(page, users_checkout):
    work, done = users_checkout

    def walk(page: str) -> None:
        if page in FOLLOWS and FOLLOWS[page] not in done:
            walk(FOLLOWS[page])
        for block in (b for b in ALL if b.page == page and b.tier != "not run"):
            run_block(block, work)
        done.add(page)

    walk(page)


@pytest.mark.parametrize("block", [pytest.param(b, id=f"{b.page}:{b.line}") for b in ALL if b.tier == "not run"])
def test_not_run(block):
    pytest.skip(f"{block.name}: not run: {block.reason}")


def test_checks_name_existing_blocks():
    for table in (CHECKS, EPILOGUES, PORTS):
        for page, snippet in table:
            matches = [b for b in ALL if b.page == page and snippet in b.code]
            assert len(matches) == 1, f"{page}: {len(matches)} blocks contain {snippet!r}; update this test's tables"
            assert table is CHECKS or matches[0].language == "bash"


def test_every_page_with_examples_is_found():
    assert {b.page for b in ALL} >= {"README.md", "docs/flavor.md", "docs/migration.md"}
    assert all(b.tier == "not run" or b.code.strip() for b in ALL)
