"""The README and docs/ stay true to the code: short landing page, links that resolve, commands that parse.

Every command in a fenced block or an inline code span that runs an entry script (`python launch/x.py`,
`deepspeed ... launch/x.py`, `torchrun ... launch/x.py`, ...) names a script that exists and whose `--help` works;
its `--section.field=value` overrides name sections and fields that `--help` lists, and the recipes, DeepSpeed
configs and hostfiles it names exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 160

LAUNCHERS = {"python", "python3", "deepspeed", "torchrun", "accelerate", "srun", "mpirun"}
SCRIPT = re.compile(r"^launch/(\w+)\.py$")
# Files a command reads from the repository; anything else it names (data, runs/...) is the user's.
REPO_FILE = re.compile(r"(?<![\w./-])((?:recipes|ds_configs|configs|hostfiles)/[\w./-]*\w)")
# `<node 0>`, `$VAR`, `...`, `recipes/NAME.yaml`: a command shape, not a command to check option by option.
PLACEHOLDER = re.compile(r"<[^>]*>|\$\{?\w|\.\.\.|…|(?:recipes|ds_configs|configs|hostfiles)/[A-Z]")
FENCE = re.compile(r"^(```|~~~)")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for messages
    text: str  # the command segment, continuations joined, re-quoted by shlex
    script: str  # launch/x.py
    args: tuple[str, ...]  # what follows the script: dapt's own arguments

    @property
    def has_placeholder(self) -> bool:
        return bool(PLACEHOLDER.search(self.text))


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(code lines, prose lines), each as (1-based line number, line); fenced blocks are code."""
    code, prose, inside = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        (code if inside else prose).append((n, line))
    return code, prose


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines ending in a backslash joined with the next; each keeps its first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in lines:
        if pending:
            n, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (n, line.rstrip()[:-1])
        else:
            out.append((n, line))
    if pending:
        out.append(pending)
    return out


def _inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(n, span) for n, line in prose for span in re.findall(r"`([^`]+)`", line)]


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: fall back to whitespace
        return text.split("#")[0].split()


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split a shell line into the commands joined by &&, ||, ; and |."""
    out, current = [], []
    for tok in tokens:
        if tok in ("&&", "||", ";", "|"):
            out.append(current)
            current = []
        else:
            current.append(tok)
    return [*out, current]


def _launch_command(where: str, segment: list[str]) -> Command | None:
    for i, tok in enumerate(segment):
        if SCRIPT.match(tok):
            if any(
                Path(t).name in LAUNCHERS or re.fullmatch(r"python3\.\d+", Path(t).name) for t in segment[:i]
            ):
                return Command(where, shlex.join(segment), tok, tuple(segment[i + 1 :]))
            return None
    return None


def _commands_in(path: Path) -> list[Command]:
    code, prose = _split_fences(path.read_text(encoding="utf-8"))
    found = []
    for n, text in _join_continuations(code) + _inline_spans(prose):
        for segment in _segments(_tokens(text)):
            cmd = _launch_command(f"{_rel(path)}:{n}", segment)
            if cmd:
                found.append(cmd)
    return found


COMMANDS = [cmd for doc in DOCS for cmd in _commands_in(doc)]
SCRIPTS = sorted({cmd.script for cmd in COMMANDS})


def _options(cmd: Command) -> tuple[list[str], list[str]]:
    """(override keys, problems) by dapt's contract: `--key=value`, `--key value`, a bare `--flag`, `-h/--help`."""
    keys, problems, args, i = [], [], cmd.args, 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            pass
        elif not arg.startswith("--"):
            problems.append(f"stray argument {arg!r}: dapt takes --section.field=value")
        else:
            key, sep, _ = arg[2:].partition("=")
            if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1  # `--key value`
            keys.append(key)
        i += 1
    return keys, problems


def _lists_option(help_text: str, name: str) -> bool:
    return re.search(rf"--{re.escape(name)}(?![\w.])", help_text) is not None


@lru_cache(maxsize=1)
def _help_outputs() -> dict[str, subprocess.CompletedProcess]:
    """`<python> launch/x.py --help` once per documented script, run side by side."""

    def run(script: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [sys.executable, script, "--help"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", f"timed out after {e.timeout} s")

    present = [s for s in SCRIPTS if (REPO / s).is_file()]
    with ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2))) as pool:
        return dict(zip(present, pool.map(run, present)))


def _help(script: str) -> str:
    result = _help_outputs()[script]
    assert result.returncode == 0, f"{script} --help exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


# --- the landing page ---------------------------------------------------------------------------------------------


def test_readme_is_a_short_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_holds_the_ci_test_command_verbatim():
    ci = REPO / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run is absent")
    command = [line for line in ci.read_text().splitlines() if line.startswith("python3 -m venv")]
    assert command, ".ci/run runs no install-and-test line"
    assert command[0] in README.read_text(encoding="utf-8").splitlines(), (
        f"README.md must hold .ci/run's test command as one line, byte for byte:\n{command[0]}"
    )


def test_readme_tables_every_entry_script():
    readme = README.read_text(encoding="utf-8")
    tabled = set(re.findall(r"^\| `(launch/\w+\.py)` \|", readme, flags=re.M))
    present = {_rel(p) for p in (REPO / "launch").glob("*.py")}
    assert tabled == present, (
        f"README's entry-point table: missing {sorted(present - tabled)}, "
        f"no such script {sorted(tabled - present)}"
    )


# --- links ------------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _, prose = _split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _links(path: Path) -> list[tuple[int, str]]:
    _, prose = _split_fences(path.read_text(encoding="utf-8"))
    out = []
    for n, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is text
        out += [(n, target) for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc: Path):
    broken = []
    for n, target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{_rel(doc)}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{_rel(doc)}:{n}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_are_linked_from_the_index():
    index = REPO / "docs" / "README.md"
    assert index.is_file(), "docs/README.md (the index) is missing"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in _links(index)}
    missing = [_rel(p) for p in DOCS[1:] if p != index and p.resolve() not in linked]
    assert not missing, f"docs pages the index does not link: {missing}"


# --- documented commands -------------------------------------------------------------------------------------------


def test_docs_hold_entry_script_commands():
    assert COMMANDS, "no `python launch/x.py` command found in README.md or docs/"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.where)
def test_documented_script_exists(cmd: Command):
    assert (REPO / cmd.script).is_file(), f"{cmd.where}: {cmd.script} does not exist\n  {cmd.text}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script: str):
    if not (REPO / script).is_file():
        pytest.skip(f"{script} does not exist (reported by test_documented_script_exists)")
    assert "--" in _help(script), f"{script} --help printed no options"


@pytest.mark.slow
def test_help_shows_each_field_with_its_type_choices_and_doc():
    """`--help` is built from the config's fields: type, choices, the field's doc and the section headings."""
    mlm, classify = _help("launch/mlm.py"), _help("launch/classify.py")
    assert "--train.max_steps=int" in mlm and "Optimizer steps to run" in mlm
    assert "--data.packing=concat | packed | pad" in mlm and "[checkpoint]" in mlm
    assert "--classify.head_lr_mult=float" in classify and "usage: launch/classify.py" in classify


CHECKABLE = [cmd for cmd in COMMANDS if not cmd.has_placeholder]


@pytest.mark.parametrize("cmd", CHECKABLE, ids=lambda c: c.where)
def test_documented_command_names_existing_files(cmd: Command):
    missing = [p for p in REPO_FILE.findall(cmd.text) if not (REPO / p).exists()]
    assert not missing, f"{cmd.where}: no such file {missing}\n  {cmd.text}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", CHECKABLE, ids=lambda c: c.where)
def test_documented_overrides_are_in_help(cmd: Command):
    if not (REPO / cmd.script).is_file():
        pytest.skip(f"{cmd.script} does not exist (reported by test_documented_script_exists)")
    help_text = _help(cmd.script)
    keys, problems = _options(cmd)
    for key in keys:
        if key == "local_rank":  # appended by the DeepSpeed launcher, never typed
            continue
        parts = key.split(".")
        if not _lists_option(help_text, parts[0]) and f"[{parts[0]}]" not in help_text:
            problems.append(f"--{key}: {cmd.script} --help has no section or option {parts[0]!r}")
        elif len(parts) > 1 and not any(
            _lists_option(help_text, ".".join(parts[:k])) for k in range(2, len(parts) + 1)
        ):
            problems.append(f"--{key}: {cmd.script} --help lists no such field")
    assert not problems, f"{cmd.where}:\n  {cmd.text}\n" + "\n".join(problems)
