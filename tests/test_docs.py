"""The README and docs/ name only commands and flags that exist.

Command lines (`ldcache CMD ...`, `cli.py CMD ...`, `python -m benchmarks.GROUP.NAME ...`, in code
blocks or inline code) are checked strictly: the command exists and takes every flag on the line;
`make TARGET` names a target of the Makefile.
A flag quoted alone in prose (a span starting `--`) must exist in some command or benchmark; other
tools' command lines (`tensorboard --logdir ...`) are not ours to check."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# An invocation starts its line or span: `ldcache`, `.venv/bin/ldcache`, `python cli.py`, `torchrun ... cli.py`
COMMAND = re.compile(r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S+\s+)*(?:torchrun\b.*?\s|\S*python\S*\s+)?(?:\S*/)?"
                     r"(?:ldcache|cli\.py) ([a-z][a-z-]*|[A-Z]+)\b(.*)")  # one space: not a file listing
MAKE = re.compile(r"^\s*make ([a-z][a-z-]*)\b(.*)")
BENCHMARK = re.compile(r"^\s*(?:\S*python\S*\s+)?-m\s+(benchmarks(?:\.[a-z_]+)+)\b(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


@cache
def cli_flags() -> dict[str, set[str]]:
    """Every ldcache command -> the flags it takes (a sweep also passes train-student's on)."""
    import cli

    group = typer.main.get_command(cli.app)
    flags = {name: {"--help"} | {o for p in c.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
             for name, c in group.commands.items()}
    flags["sweep"] |= flags["train-student"]
    return flags


class _Parsed(Exception):
    def __init__(self, flags: set[str]):
        self.flags = flags


@cache
def benchmark_flags(module: str) -> set[str]:
    """The flags of a benchmark script: its main() is run until it parses its arguments."""
    mod = importlib.import_module(module)

    def capture(self, args=None, namespace=None):  # argparse has no public list of its options
        raise _Parsed({o for a in self._actions for o in a.option_strings if o.startswith("--")})

    patch = pytest.MonkeyPatch()
    patch.setattr(argparse.ArgumentParser, "parse_args", capture)
    patch.setattr(sys, "argv", [module])
    try:
        mod.main()
    except _Parsed as parsed:
        return parsed.flags
    finally:
        patch.undo()
    raise AssertionError(f"{module}.main() returned without parsing arguments")


def _code(text: str) -> tuple[list[str], list[str]]:
    """(lines of fenced code blocks with `\\` continuations joined, inline code spans)."""
    blocks, spans, inside = [], [], False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            blocks.append(line.split(" #")[0])
        else:
            spans += re.findall(r"`([^`]+)`", line)
    return blocks, spans


def _commands(doc: Path) -> list[tuple[str, str, str]]:
    """(kind, name, the rest of the line) for every command line in a document."""
    blocks, spans = _code(doc.read_text())
    found = []
    for line in blocks + spans:
        for part in re.split(r"&&|\|\||;|\|", line):
            if m := COMMAND.search(part):
                found.append(("ldcache", m.group(1), m.group(2)))
            elif m := BENCHMARK.search(part):
                found.append(("benchmark", m.group(1), m.group(2)))
            elif m := MAKE.search(part):
                found.append(("make", m.group(1), m.group(2)))
    return found


def command_problems(doc: Path) -> list[str]:
    wrong = []
    for kind, name, rest in _commands(doc):
        if kind == "make":
            if not re.search(rf"^{name}:", (ROOT / "Makefile").read_text(), re.M):
                wrong.append(f"make {name}: no such target")
            continue
        if kind == "ldcache":
            if name.isupper():  # a placeholder: `ldcache COMMAND --help`
                continue
            if name not in cli_flags():
                wrong.append(f"ldcache {name}: no such command")
                continue
            known = cli_flags()[name]
        else:
            try:
                known = benchmark_flags(name)
            except ModuleNotFoundError:
                wrong.append(f"python -m {name}: no such module")
                continue
        wrong += [f"{name} {flag}: no such flag" for flag in FLAG.findall(rest) if flag not in known]
    return sorted(set(wrong))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_name_real_commands_and_flags(doc):
    assert command_problems(doc) == [], doc.name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_quoted_in_prose_exist(doc):
    modules = {f"benchmarks.{p.parent.name}.{p.stem}" for p in (ROOT / "benchmarks").glob("*/*.py")
               if p.parent.name in ("suite", "studies") and p.stem != "__init__"} | {"benchmarks.run_all"}
    known = set().union(*cli_flags().values(), *(benchmark_flags(m) for m in sorted(modules)))
    _, spans = _code(doc.read_text())
    unknown = {flag for span in spans if span.startswith("--") for flag in FLAG.findall(span) if flag not in known}
    assert not unknown, f"{doc.name} quotes flags no command or benchmark takes: {sorted(unknown)}"


def test_the_checker_sees_a_wrong_command_flag_module_and_target(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("run `ldcache dump-teacher --teacher t.pt --no-such-flag` or `make fly`, not `make test`\n"
                   "```bash\nldcache fly --out x  # ldcache walk\npython -m benchmarks.suite.nothing\n"
                   "python -m benchmarks.suite.dump_throughput \\\n    --num-images 8 --bogus 1\n```\n")
    assert command_problems(doc) == ["benchmarks.suite.dump_throughput --bogus: no such flag",
                                     "dump-teacher --no-such-flag: no such flag", "ldcache fly: no such command",
                                     "make fly: no such target", "python -m benchmarks.suite.nothing: no such module"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings (fenced code skipped)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def link_problems(doc: Path) -> list[str]:
    """Links whose target whitespace cut in two, and links to headings a markdown file lacks."""
    text = doc.read_text()
    problems = [f"cut link: {cut!r}" for cut in re.findall(r"\]\([^)\s]*\s", text)]
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        path = doc if not target else doc.parent / target
        if path.suffix == ".md" and path.exists() and anchor not in heading_anchors(path.read_text()):
            problems.append(f"no heading: {target}#{anchor}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_are_whole_and_their_anchors_exist(doc):
    assert not link_problems(doc)


def test_the_link_check_sees_a_cut_link_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: its title\n\n```bash\n# not a heading\n```\n\n[ok](#a-page-its-title) "
                    "[gone](#not-a-heading) [cut](page.md#a-page-\nits-title)\n")
    assert heading_anchors(page.read_text()) == {"a-page-its-title"}
    assert link_problems(page) == ["cut link: '](page.md#a-page-\\n'", "no heading: #not-a-heading"]
