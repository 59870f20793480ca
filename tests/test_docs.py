"""Every code block of README.md and docs/*.md that a user can run is run here.

So the documentation cannot drift from the code again. The convention (also stated in
docs/index.md for contributors):

* A fenced block tagged ```python runs in a fresh interpreter. A block tagged ```bash,
  ```sh or ```console runs with ``bash -euo pipefail`` when each of its commands starts
  with ``unioncam`` or ``python`` (after optional ``VAR=value`` words). In a ```console
  block only the lines that start with ``$ `` are commands; the rest is output.
* The runnable blocks of one Markdown file run in file order, in one temporary folder
  (the working directory) that belongs to that file. A block can use the files an
  earlier block of the same file wrote (photos, a manifest, a store), never its
  variables. Keep inputs tiny: a few photos from scikit-image, ``--image-size 64``,
  ``--preset fast``, ``--cpu``.
* A block that cannot run in a test (``pip install``, cluster or cloud commands, S3/GCS,
  a GPU, hours of compute, the test suite itself) is tagged ```text, or gets the word
  ``norun`` after its language: ```bash norun, ```python norun. A shell block with any
  other command that is not tagged ``norun`` fails ``test_shell_blocks_are_runnable_or_norun``.
  Every ```python block, ``norun`` included, must at least compile.
* Each runnable block is one test, with the id ``<file>:<line of its opening fence>``.
  Selecting one block (``-k "pipeline.md:120"``) first runs the blocks of its file that
  come before it, since it may need their files.

Inside the blocks ``python`` is this interpreter and ``unioncam`` is the console script
declared in pyproject.toml, run from this checkout (PYTHONPATH = the repository root),
with ``UNIONCAM_DEBUG=1`` so a failure shows its traceback and ``RAY_AUTH_MODE=disabled``
for the local Ray instance.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
RUNNABLE_COMMANDS = {"unioncam", "python"}
BLOCK_TIMEOUT_S = 900
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    norun: bool
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def runnable(self) -> bool:
        if self.norun:
            return False
        if self.lang == "python":
            return True
        return self.lang in SHELL_LANGS and bool(self.commands()) and not self.foreign_commands()

    def commands(self) -> list[str]:
        """The shell commands of the block, continuation lines joined, comments dropped."""
        lines = self.code.splitlines()
        if self.lang == "console":
            lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
        out: list[str] = []
        cur = ""
        for ln in lines:
            s = ln.strip()
            if not cur and (not s or s.startswith("#")):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            out.append(cur + s)
            cur = ""
        if cur:
            out.append(cur)
        return out

    def foreign_commands(self) -> list[str]:
        """Commands that do not start with unioncam or python (need ``norun``)."""
        bad = []
        for cmd in self.commands():
            words = cmd.split()
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words = words[1:]
            if not words or words[0] not in RUNNABLE_COMMANDS:
                bad.append(cmd)
        return bad

    def script(self) -> str:
        if self.lang == "console":
            return "\n".join(self.commands()) + "\n"
        return self.code


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file, with their language and ``norun`` flag."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        words = info.split()
        lang = words[0].lower() if words else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) \
                    and not close["info"].strip():
                break
            ln = lines[j]
            body.append(ln[len(indent):] if ln.startswith(indent) else ln.lstrip())
            j += 1
        blocks.append(Block(path, i + 1, lang, "norun" in words[1:], "\n".join(body) + "\n"))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in parse_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if b.runnable]


# ---------------------------------------------------------------------------------------
# running


@dataclass
class FileState:
    """The working folder of one Markdown file and which of its blocks ran."""

    workdir: Path
    ran: dict[int, bool] = field(default_factory=dict)  # line -> passed


def _console_script() -> str:
    """``module:function`` of the ``unioncam`` script declared in pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]["unioncam"]


@pytest.fixture(scope="session")
def doc_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the blocks: ``python`` and ``unioncam`` from this checkout."""
    bindir = tmp_path_factory.mktemp("docs-bin")
    module, _, func = _console_script().partition(":")
    exe = shlex.quote(sys.executable)
    (bindir / "python").write_text(f'#!/bin/sh\nexec {exe} "$@"\n')
    (bindir / "unioncam").write_text(
        f"#!/bin/sh\nexec {exe} -c "
        + shlex.quote(f"import sys; from {module} import {func}; sys.exit({func}())")
        + ' "$@"\n'
    )
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["UNIONCAM_DEBUG"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


@pytest.fixture(scope="session")
def file_states(tmp_path_factory) -> dict[Path, FileState]:
    states: dict[Path, FileState] = {}
    for p in DOC_FILES:
        name = re.sub(r"[^A-Za-z0-9]+", "-", p.relative_to(ROOT).as_posix())
        states[p] = FileState(tmp_path_factory.mktemp(f"docs-{name}"))
    return states


def _run(block: Block, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.script()]
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT_S} s\n{e.stdout or ''}")


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _run_recorded(block: Block, state: FileState, env: dict[str, str]) -> str | None:
    """Run ``block``; None when it passed, else the failure text."""
    proc = _run(block, state.workdir, env)
    state.ran[block.line] = proc.returncode == 0
    if proc.returncode == 0:
        return None
    return (f"{block.id} exited {proc.returncode} (cwd {state.workdir})\n"
            f"--- block ---\n{block.code}--- stdout ---\n{_tail(proc.stdout)}\n"
            f"--- stderr ---\n{_tail(proc.stderr)}")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
@pytest.mark.slow  # minutes: every example of the docs, several starting Ray
def test_doc_block_runs(block: Block, file_states, doc_env) -> None:
    state = file_states[block.path]
    for earlier in RUNNABLE:
        if earlier.path != block.path or earlier.line >= block.line:
            continue
        if earlier.line not in state.ran:  # selected alone: run what it builds on
            _run_recorded(earlier, state, doc_env)  # a failure is reported by its own test
        if not state.ran[earlier.line]:
            pytest.skip(f"needs {earlier.id}, which failed")
    if block.line in state.ran:  # already run as an earlier block of a selected one
        if not state.ran[block.line]:
            pytest.fail(f"{block.id} failed when run before a later block of its file")
        return
    failure = _run_recorded(block, state, doc_env)
    if failure:
        pytest.fail(failure, pytrace=False)


# ---------------------------------------------------------------------------------------
# the convention itself


def test_shell_blocks_are_runnable_or_norun() -> None:
    """A shell block either runs here or says ``norun``: none is silently left out."""
    bad = [f"{b.id}: {b.foreign_commands()[0]!r}" for b in ALL_BLOCKS
           if b.lang in SHELL_LANGS and not b.norun and b.foreign_commands()]
    assert not bad, ("shell blocks with commands other than unioncam/python must be tagged "
                     "'bash norun' or 'text':\n" + "\n".join(bad))


def test_untagged_blocks_say_what_they_are() -> None:
    """Every fence names a language (``text`` for output and for what does not run)."""
    bad = [b.id for b in ALL_BLOCKS if not b.lang]
    assert not bad, "code blocks without a language (use text, python, bash, bash norun):\n" \
        + "\n".join(bad)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "python"],
                         ids=[b.id for b in ALL_BLOCKS if b.lang == "python"])
def test_python_blocks_compile(block: Block) -> None:
    compile(block.code, block.id, "exec")


def test_readme_is_a_guide() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines; the rest belongs in docs/"


LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")


def test_relative_links_resolve() -> None:
    """Links between README.md, docs/ and benchmarks/results point at files that exist."""
    missing = []
    for p in DOC_FILES:
        for n, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(ln):
                if not (p.parent / target).exists():
                    missing.append(f"{p.relative_to(ROOT)}:{n}: {target}")
    assert not missing, "broken relative links:\n" + "\n".join(missing)
