"""The README and docs/ stay exact: set-up commands, `cellmi` command lines, relative links.

Every `cellmi ...` command line in a fenced code block or an inline code span of README.md and
docs/*.md must name a job and only known settings (parsed as the CLI parses them, the job is
not run); every relative link must point to a file that exists, and a `#anchor` to a heading
of that file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellmi.cli import JOBS, load_settings
from cellmi.launch import _parser as launch_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = ["make run", "make test"]
README_MAX_LINES = 250

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
IMAGE = re.compile(r"^(\S+/)?cellmi:\S+$")  # a container image of cellmi: docker run ... cellmi:tag JOB
SPAN_COMMAND = re.compile(r"^cellmi [a-z][a-z-]*( |$)")  # not `cellmi ingest: error:`
# Lines worth tokenising: something that could start cellmi.
MAYBE = re.compile(r"(^|[\s;&|(])(\S*/)?cellmi(:\S+)?\s+-?-?[a-z]")


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    env: dict[str, str]
    job: str
    args: list[str]


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of fenced code blocks, backslash continuations joined, and of inline
    code spans that are a cellmi command."""
    found = []
    for block in FENCE.finditer(text):
        pending, start = "", 0
        for number, line in enumerate(block.group(1).split("\n"), text.count("\n", 0, block.start(1)) + 1):
            start = start if pending else number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            found.append((start, pending + line))
            pending = ""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        code = " ".join(span.group(1).split())
        if SPAN_COMMAND.match(code):
            found.append((prose.count("\n", 0, span.start()) + 1, code))
    return found


def simple_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line: split at ;, &, |, parentheses; redirections
    (``>``, ``<`` and the word after them) dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if redirect:
            redirect = False
        elif token and set(token) <= set("<>"):
            redirect = True
        elif token and set(token) <= set("();|&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def invocation(words: list[str]) -> tuple[dict[str, str], str, list[str]] | None:
    """(environment assignments, job, job arguments) when the words run cellmi, else None."""
    env = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    if not words:
        return None
    if words[0] == "cellmi" or words[0].endswith("/cellmi"):
        rest = words[1:]
    elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "cellmi":
        rest = words[words.index("-m") + 2 :]
    elif words[0] in ("docker", "podman") and any(IMAGE.match(w) for w in words):
        rest = words[next(i for i, w in enumerate(words) if IMAGE.match(w)) + 1 :]
    else:
        return None
    return (env, rest[0], rest[1:]) if rest else (env, "", [])


def commands_in(path: Path, name: str | None = None) -> list[Command]:
    """The cellmi command lines of a Markdown file; ``where`` is ``name:line`` (name: the path
    relative to the repository)."""
    name = name or str(path.relative_to(ROOT))
    found = []
    for number, line in code_lines(path.read_text()):
        if not MAYBE.search(line):
            continue
        for words in simple_commands(line):
            parsed = invocation(words)
            if parsed is not None:
                found.append(Command(f"{name}:{number}", *parsed))
    return found


ALL_COMMANDS = [c for path in DOCUMENTS for c in commands_in(path)]


def check_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None when the command's job exists and its settings parse; else what is wrong."""
    if command.job not in JOBS:
        return f"unknown job {command.job!r} (jobs: {', '.join(JOBS)})"
    args = command.args
    if command.job == "launch":
        try:
            options = launch_parser().parse_args(args)
        except SystemExit:
            return f"cellmi launch does not accept {args}"
        if options.job != "train":
            return None
        args = options.args
    for name in [n for n in os.environ if n.startswith("CELLMI_")]:
        monkeypatch.delenv(name)
    for name, value in command.env.items():
        monkeypatch.setenv(name, value)
    try:
        load_settings(args, prog=f"cellmi {command.job}")
    except SystemExit:
        return f"settings do not parse: {' '.join(args)}"
    except Exception as err:  # a validation error or an unknown CELLMI_ variable
        return f"settings do not parse: {err}"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(text):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file (or heading) does not exist."""
    text = FENCE.sub("", path.read_text())
    text = INLINE.sub("", text)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


# ----------------------------------------------------------------------------- the checks


def test_setup_commands_are_the_readme_quickstart_and_make_targets():
    text = (ROOT / "README.md").read_text()
    blocks = [[line.split("#")[0].strip() for line in b.group(1).splitlines()] for b in FENCE.finditer(text)]
    setup = [b for b in blocks if b and b[0].startswith("make ")]
    assert setup and setup[0] == SETUP, f"README set-up block is {setup[:1]}, expected {SETUP}"
    for command in SETUP:
        target = command.split()[1]
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, f"`{command}`: {dry.stderr.strip()}"


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_quickstart_lines_are_found():
    """The extraction sees the quickstart (so the parse checks below check something)."""
    seen = {(c.job, " ".join(c.args)) for c in ALL_COMMANDS if c.where.startswith("README.md")}
    assert ("run", "--quick") in seen
    assert ("train", "--workdir ./w") in seen  # CELLMI_TRAIN__STEPS=2000 torchrun ... -m cellmi train
    assert ("cluster", "--workdir ./w --cluster.split all") in seen


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_cellmi_command_lines_parse(command, monkeypatch):
    problem = check_command(command, monkeypatch)
    assert problem is None, f"{command.where}: {problem}"


def test_a_bad_command_line_is_caught(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\nCELLMI_TRAIN__STEPZ=3 cellmi train\ncellmi train --train.stepz 5\ncellmi trian\n"
        "cellmi run --source ./a \\\n    --ingest.preset nope\n```\nand `cellmi ingest --ingest.chanels x`\n"
    )
    found = commands_in(doc, "x.md")
    assert [c.job for c in found] == ["train", "train", "trian", "run", "ingest"]
    assert [c.where for c in found] == ["x.md:2", "x.md:3", "x.md:4", "x.md:5", "x.md:8"]
    assert all(check_command(c, monkeypatch) for c in found)


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_relative_links_point_to_existing_files(path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Sub part\n")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#sub-part) [x](missing.md) [y](a.md#nope) [z](#here) ![i](img.png)\n"
                   "`[not](a-link.md)`\n\n# Here\n")
    found = broken_links(doc)
    assert [b.split(" ")[0] for b in found] == ["missing.md", "a.md#nope", "img.png"]
