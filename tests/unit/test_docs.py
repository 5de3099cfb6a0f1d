"""The manual (docs/) and the README: they build without a warning, every link in them leads
somewhere, every command they show exists and parses, every command-line option and every clean
operation has its entry, and the recorded run they show is a whole run of today's notebooks.

The build is Sphinx's own (as ``make docs``): with ``-W`` an internal link that does not resolve,
an option of the generated command reference without its ``{option}`` entry, or a clean operation
without its ``{cleanop}`` entry is an error. The tests below say which one, by name.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from imaging import config
from imaging.cli import build_parser
from imaging.config import PROJECT
from imaging.guest import clean_ops
from imaging.run import audit

DOCS = PROJECT / "docs"
EXAMPLE = DOCS / "audit-example"
README = PROJECT / "README.md"


def pages() -> list[Path]:
    """The hand-written Markdown: the README and the manual's pages (not what the build generates)."""
    found = [p for p in DOCS.rglob("*.md") if not {"_build", "_generated"} & set(p.relative_to(DOCS).parts)]
    return [README, *sorted(found)]


@dataclass(frozen=True)
class Build:
    html: Path
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The manual built as ``make docs`` builds it; with --keep-going the pages and the inventory
    are written even when a warning fails the build, so each test below can say what it found."""
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Build(out / "html", proc.returncode, proc.stderr)


def inventory(built: Build) -> dict[str, set[str]]:
    """What the manual documents, by Sphinx's object type (``std:cmdoption``, ``std:cleanop``)."""
    from sphinx.util.inventory import InventoryFile

    assert (built.html / "objects.inv").is_file(), f"the manual did not build:\n{built.stderr}"
    with open(built.html / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", lambda base, uri: uri)
    data = getattr(inv, "data", inv)  # Sphinx 8.2+: an Inventory object
    return {kind: set(objects) for kind, objects in data.items()}


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_manual_builds_without_a_warning(built: Build) -> None:
    assert built.returncode == 0, f"the manual does not build cleanly:\n{built.stderr}"
    for page in ("index", "exports", "targets", "clean-and-migrate", "secrets", "api", "audit",
                 "troubleshooting", "commands", "development", "audit-example/notebooks/50-verify"):  # fmt: skip
        assert (built.html / f"{page}.html").is_file(), page


def test_every_command_line_option_has_an_entry(built: Build) -> None:
    documented = inventory(built).get("std:cmdoption", set())
    wanted = {
        f"imaging-{name}.{option}"
        for name, command in commands().items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }
    missing = sorted(wanted - documented)
    assert not missing, (
        f"options without an entry in the manual: {missing}: add an {{option}} entry after the "
        "{program} of its command, on the page where a user would look for it"
    )
    stale = sorted(documented - wanted)
    assert not stale, f"entries in the manual for options the command line no longer has: {stale}"


def test_every_clean_operation_has_an_entry(built: Build) -> None:
    documented = inventory(built).get("std:cleanop", set())
    missing = sorted(set(clean_ops.REGISTRY) - documented)
    assert not missing, (
        f"clean operations without a {{cleanop}} entry in docs/clean-and-migrate.md: {missing}"
    )
    stale = sorted(documented - set(clean_ops.REGISTRY))
    assert not stale, f"entries in the manual for clean operations that no longer exist: {stale}"


def test_the_generated_tables_come_from_the_code(built: Build) -> None:
    def words(page: str) -> str:
        return " ".join(
            html.unescape(re.sub(r"<[^>]+>", " ", (built.html / page).read_text(encoding="utf-8"))).split()
        )

    text = words("clean-and-migrate.html")
    for op in clean_ops.REGISTRY.values():
        assert f"{op.name} " in text and op.heading in text, op.name
    for profile in config.available("profiles"):
        assert f" {profile} " in text, profile
    api = words("api.html")
    assert "PATCH /api/v1/request_image/{request_id}" in api and "CreateRequest" in api


# Links --------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MyST make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    found = {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)}
    return found | set(re.findall(r"^\(([\w-]+)\)=\s*$", text, re.MULTILINE))


def test_every_link_in_the_readme_and_the_manual_leads_somewhere() -> None:
    broken = []
    for page in pages():
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:: not ours to check here
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                broken.append(f"{page.relative_to(PROJECT)}: {target}: no such file")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{page.relative_to(PROJECT)}: {target}: no such heading")
    assert not broken, "\n".join(broken)


# Commands shown -----------------------------------------------------------------------------------

BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def shown() -> list[tuple[str, str, list[str]]]:
    """(page, language, argv) of every command line in a code block: ``imaging ...``,
    ``python -m imaging ...`` and ``make ...``. In a ``console`` block only the lines after a
    ``$`` prompt are commands; in ``text`` blocks, synopses (the command's name is what counts)."""
    found = []
    for page in pages():
        for language, body in BLOCK.findall(page.read_text(encoding="utf-8")):
            if language not in ("sh", "console", "text", "bash"):
                continue
            lines = body.replace("\\\n", " ").splitlines()
            for line in lines:
                if language == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                argv = _command(words)
                if argv:
                    found.append((str(page.relative_to(PROJECT)), language, argv))
    return found


SHELL_OPERATORS = {"&", "&&", "|", "||", ";"}


def _command(words: list[str]) -> list[str] | None:
    """``imaging export ...`` (also after ``VAR=value`` or as ``.venv/bin/imaging`` or
    ``python -m imaging``, or in ``$(...)``) -> ``["imaging", "export", ...]``; ``make demo`` ->
    ``["make", "demo"]``."""
    wrapped = any(w.startswith("$(") or "=$(" in w for w in words)
    words = [re.sub(r"^(?:[A-Za-z_][A-Za-z0-9_]*=)?\$\(", "", w) for w in words]
    if wrapped and words and words[-1].endswith(")"):
        words[-1] = words[-1][:-1]
    ends = [i for i, w in enumerate(words) if w in SHELL_OPERATORS or w.startswith((">", "2>"))]
    words = words[: ends[0]] if ends else words
    for i, word in enumerate(words):
        if word == "imaging" and i > 0 and words[i - 1] == "-m":
            return ["imaging", *words[i + 1 :]]
        if (word == "imaging" or word.endswith("/imaging")) and all("=" in w for w in words[:i]):
            return ["imaging", *words[i + 1 :]]
        if word == "make" and i == 0:
            return words
    return None


def test_every_imaging_command_shown_exists_and_parses() -> None:
    found = [(page, lang, argv) for page, lang, argv in shown() if argv[0] == "imaging"]
    assert len(found) > 20, found  # the README's and the manual's examples are found at all
    names = sorted({argv[1] for _, _, argv in found if len(argv) > 1 and not argv[1].startswith("-")})
    unknown = sorted(set(names) - set(commands()))
    assert not unknown, f"commands shown that imaging does not have: {unknown}"

    def helps(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        proc = subprocess.run([sys.executable, "-m", "imaging", *([name] if name else []), "--help"],
                              cwd=PROJECT, capture_output=True, text=True, timeout=120)  # fmt: skip
        return name, proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, proc in pool.map(helps, ["", *names]):
            assert proc.returncode == 0 and "usage:" in proc.stdout, f"imaging {name} --help: {proc.stderr}"

    bad = []
    for page, language, argv in found:
        if language == "text":  # a synopsis, with its placeholders
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv[1:])
        except SystemExit as e:
            if e.code:
                bad.append(f"{page}: {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def test_every_make_target_shown_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (PROJECT / "Makefile").read_text(), re.MULTILINE))
    missing = sorted({f"{page}: make {t}" for page, _, argv in shown() if argv[0] == "make"
                      for t in argv[1:] if "=" not in t and not t.startswith("-") and t not in targets})  # fmt: skip
    assert not missing, missing


# The recorded run ---------------------------------------------------------------------------------

RERECORD = "record it again: make docs-example (root; exports the kvm sample and boots it)"


def code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    skip = {"parameters", "injected-parameters"}
    return [
        c.source for c in nb.cells if c.cell_type == "code" and not skip & set(c.metadata.get("tags", []))
    ]


RENDERS = EXAMPLE / "html" / "audit-example" / "notebooks"


def page_text(path: Path) -> str:
    """What a reader of an HTML render sees: its tags gone, its entities read."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_the_recorded_run_is_a_whole_run_of_the_current_notebooks() -> None:
    state = json.loads((EXAMPLE / "state.json").read_text())
    assert state["state"] == "completed", RERECORD
    request = json.loads((EXAMPLE / "request.json").read_text())
    stages = config.load_defaults().pipelines[request["kind"]]
    recorded = sorted(p.stem for p in RENDERS.glob("*.html"))
    assert recorded == stages, (
        f"the recorded run's stages {recorded} are not the pipeline's {stages}: {RERECORD}"
    )
    for stage in stages:
        text = page_text(RENDERS / f"{stage}.html")
        lines = [line.strip() for cell in code_cells(PROJECT / "notebooks" / f"{stage}.ipynb")
                 for line in cell.splitlines() if line.strip()]  # fmt: skip
        missing = [line for line in lines if line not in text]
        assert not missing, (
            f"notebooks/{stage}.ipynb changed since the run in docs/audit-example was recorded "
            f"({missing[0]!r}): {RERECORD}"
        )
        assert "Traceback" not in text, f"{stage}: the recorded notebook holds an error"
        assert "Summary" in text, f"{stage}: the recorded notebook has no summary"
    result = json.loads((EXAMPLE / "result.json").read_text())
    assert result["boot"]["verdict"] == "booted"


def test_the_recorded_files_are_those_on_the_runs_audit_chain() -> None:
    chain = json.loads((EXAMPLE / "audit.json").read_text())
    prev, digests = audit.GENESIS, {}
    for entry in chain["entries"]:
        assert entry["prev"] == prev and entry["hash"] == audit.link(prev, entry["file"], entry["sha256"])
        prev, digests[entry["file"]] = entry["hash"], entry["sha256"]
    kept = {f"notebooks/{p.name}": p for p in sorted(RENDERS.glob("*.html"))}
    kept["result.json"] = EXAMPLE / "result.json"
    for name, path in kept.items():
        assert digests.get(name) == hashlib.sha256(path.read_bytes()).hexdigest(), (
            f"docs/audit-example/{name} is not the file its run recorded: {RERECORD}"
        )
