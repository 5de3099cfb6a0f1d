"""One HTML page per run for an auditor, and an index of all runs.

``runs/<id>/report.html`` holds, in one self-contained file (CSS inline, images as ``data:``
URIs, no scripts): the run's verdicts (boot, and the audit chain checked on the spot), its
artifact and sha256, per-stage timings, the request and every state change; then every executed
notebook in pipeline order, failed attempts included and marked. The notebooks are rendered by
nbconvert from one notebook assembled of all of them, so they look as they do on their own.
``runs/index.html`` lists every run with its state, stage, artifact and sha256, linked to its
report.

Everything a request or an image can put on these pages (names, paths, errors, file names from
the guest) is HTML-escaped here; the notebooks' own outputs are escaped where they are made
(``tables.Table``, ``records.Text``, ``summary.text``) and by nbconvert (streams, tracebacks).
"""

from __future__ import annotations

import html
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbformat

from imaging import config
from imaging.errors import ParameterError
from imaging.run import audit, pages, scraps, summary
from imaging.sparse import atomic_path

# A completed stage, a failed attempt of it (.failed-N), or the notebook of an earlier attempt of
# the whole run that another host abandoned and started again (.attempt-N, see audit.move).
_NOTEBOOK = re.compile(r"(?P<stage>[0-9]{2}-[a-z0-9-]+?)(?:\.(?P<tag>(?:failed|attempt)-[0-9]+))?\.ipynb")
_STYLE = """<style>
.imaging-report table { border-collapse: collapse; margin: 0.5em 0 1em; }
.imaging-report th, .imaging-report td { border: 1px solid #ccc; padding: 2px 8px;
  text-align: left !important; vertical-align: top; }
.imaging-report .ok { color: #106b10; font-weight: bold; }
.imaging-report .bad { color: #b00000; font-weight: bold; }
.imaging-report code { word-break: break-all; }
</style>"""


def e(value: Any) -> str:
    """Text for HTML: every character shown as itself."""
    return html.escape("" if value is None else str(value), quote=True)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None) -> str:
    header = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{header}{body}</table>"


def _code(value: Any) -> str:
    return f"<code>{e(value)}</code>" if value not in (None, "") else "-"


def _label(tag: str | None) -> str:
    """How a notebook's tag reads: ``failed attempt 2``, ``attempt 1 (abandoned)``."""
    if tag is None:
        return "completed"
    what, _, n = tag.partition("-")
    return (
        f"failed attempt {n}" if what == "failed" else f"attempt {n} (abandoned, run again from the start)"
    )


def stage_notebooks(root: Path) -> list[tuple[str, str | None, Path]]:
    """(stage, tag or None, notebook), in pipeline order, each stage's earlier attempts and
    failed attempts before its completed run."""
    found = []
    for path in (root / "notebooks").glob("*.ipynb"):
        m = _NOTEBOOK.fullmatch(path.name)
        if m:
            found.append((m["stage"], m["tag"], path))
    kind = str(_json(root / "request.json").get("kind") or "export")
    try:
        order = config.pipeline_stages(kind)
    except Exception:  # a run of a kind no longer configured: by stage number
        order = []

    def key(item: tuple[str, str | None, Path]) -> tuple[int, str, int, int]:
        stage, tag, _ = item
        position = order.index(stage) if stage in order else len(order)
        what, _, n = (tag or "").partition("-")
        return (position, stage, {"attempt": 0, "failed": 1}.get(what, 2), int(n or 0))

    return sorted(found, key=key)


def _boot_verdict(boot: dict[str, Any]) -> str:
    if not boot:
        return "<span>not checked (this run has no boot check, or it has not run)</span>"
    verdict = boot.get("verdict")
    ok = verdict == "booted"
    word = {"booted": "booted", "degraded": "degraded"}.get(str(verdict), "did not boot")
    how = (
        f"{e(boot.get('reason'))} {_code(boot.get('matched'))}"
        if boot.get("matched")
        else e(boot.get("reason"))
    )
    seen = "".join(f", {label} {_code(boot.get(key))}" for key, label in (("dhcp", "DHCP"), ("ssh", "sshd"))
                   if boot.get(key))  # fmt: skip
    return (
        f"<span class='{'ok' if ok else 'bad'}'>{word}</span>: {how}{seen}, "
        f"{e(boot.get('seconds'))} s, {e(boot.get('controller'))}, {e(boot.get('accel'))}"
    )


def _audit_verdict(report: audit.Report) -> str:
    if report.ok:
        return f"<span class='ok'>intact</span>: {report.entries} files chained, head {_code(report.head)}"
    problems = "".join(f"<li>{e(p)}</li>" for p in report.problems)
    return f"<span class='bad'>BROKEN</span>: <ul>{problems}</ul>"


def _read(path: Path) -> nbformat.NotebookNode | str:
    """The notebook, or why it cannot be read (a damaged record still gets its report)."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises several kinds for a damaged file
        return f"{path.name} cannot be read as a notebook: {type(exc).__name__}: {exc}"


def _summaries(notebooks: list[tuple[str, str | None, Path]]) -> str:
    """Each notebook's summary cell (see summary.py), rendered: what every stage did, first."""
    from nbconvert.filters import markdown2html

    parts = []
    for stage, n, path in notebooks:
        nb = _read(path)
        title = f"{e(stage)}" + (f" ({e(_label(n))})" if n else "")
        if isinstance(nb, str):
            body = f"<p class='bad'>{e(nb)}</p>"
        else:
            cells = [c for c in nb.cells if summary.TAG in c.get("metadata", {}).get("tags", [])]
            # The cell's own "## Summary" heading gives way to the stage's name.
            body = (
                markdown2html(cells[0].source.removeprefix("## Summary").strip())
                if cells
                else "<p>(no summary)</p>"
            )
        parts.append(f"<h3><a href='#{e(_anchor(stage, n))}'>{title}</a></h3>{body}")
    return "".join(parts)


def _header(root: Path, notebooks: list[tuple[str, str | None, Path]], chain: str) -> str:
    request = _json(root / "request.json")
    state = _json(root / "state.json")
    result = _json(root / "result.json")
    boot = result.get("boot") or _json(root / "results" / "50-verify.json")
    timings = result.get("timings") or state.get("timings") or {}
    overview = _table([
        ("run", _code(root.name)),
        ("state", f"{e(state.get('state', 'unknown'))}" + (f" at {e(state['stage'])}" if state.get("stage") else "")),
        ("error", e(state.get("error")) if state.get("error") else "-"),
        ("boot check", _boot_verdict(boot if isinstance(boot, dict) else {})),
        ("audit chain", chain),
        ("artifact", _code(result.get("path"))),
        ("sha256", _code(result.get("sha256"))),
        ("source", f"{_code(request.get('source'))}, {_code(result.get('source_digest'))}"),
        ("format, target", f"{e(request.get('format'))}, {e(request.get('target'))}"),
    ])  # fmt: skip
    stages = []
    for stage, n, path in notebooks:
        anchor = _anchor(stage, n)
        status = f"<span class='bad'>{e(_label(n))}</span>" if n else "<span class='ok'>completed</span>"
        seconds = (timings.get(stage) or {}).get("seconds") if n is None else None
        stages.append((f"<a href='#{e(anchor)}'>{e(stage)}</a>", status, e(seconds) if seconds else "-",
                       _code(f"notebooks/{path.name}")))  # fmt: skip
    history = [(e(h.get("time")), e(h.get("state")), e(h.get("stage") or ""), e(h.get("error") or ""))
               for h in state.get("history", [])]  # fmt: skip
    return (
        f"{_STYLE}<div class='imaging-report'><h1 id='run'>Audit record of run {e(root.name)}</h1>"
        f"{overview}<h2>What each stage did</h2>{_summaries(notebooks)}"
        f"<h2>Stages</h2>{_table(stages, ('stage', 'outcome', 'seconds', 'executed notebook'))}"
        f"<h2>Request</h2>{_table([(e(k), _code(json.dumps(v))) for k, v in request.items()])}"
        f"<h2>State changes</h2>{_table(history, ('time', 'state', 'stage', 'error'))}</div>"
    )


def _anchor(stage: str, n: str | None) -> str:
    return f"stage-{stage}" + (f"-{n}" if n else "")


def _html_cell(body: str) -> nbformat.NotebookNode:
    """A cell that shows ``body`` (already escaped HTML) and hides its (empty) source."""
    cell = nbformat.v4.new_code_cell("", metadata={"tags": [pages.HIDDEN]})
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": body})]
    return cell


def _stage_heading(stage: str, n: str | None) -> str:
    title = f"Stage {e(stage)}" + (f": {e(_label(n))}" if n else "")
    note = ""
    if n and n.startswith("failed"):
        note = "<p class='bad'>This attempt failed; the run went on from here when it was resumed.</p>"
    elif n:
        note = ("<p class='bad'>This stage completed in an attempt whose host was lost before the run "
                "ended; the run was started again from its first stage on another host.</p>")  # fmt: skip
    return f"<div class='imaging-report'><hr><h1 id='{e(_anchor(stage, n))}'>{title}</h1>{note}</div>"


def _shown(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A stage's cell without the stage's machine-readable result (shown as a table already)."""
    if cell.cell_type == "code":
        cell.outputs = [o for o in cell.get("outputs", []) if scraps.MIME not in o.get("data", {})]
    return cell


def assemble(root: Path, chain: str | None = None) -> nbformat.NotebookNode:
    """One notebook: the run's header, then every stage's executed notebook in order. ``chain``
    is what the header says of the audit chain (HTML); by default, its check made here."""
    notebooks = stage_notebooks(root)
    merged = nbformat.v4.new_notebook()
    verdict = _audit_verdict(audit.verify(root)) if chain is None else chain
    merged.cells.append(_html_cell(_header(root, notebooks, verdict)))
    for stage, n, path in notebooks:
        merged.cells.append(_html_cell(_stage_heading(stage, n)))
        nb = _read(path)
        if isinstance(nb, str):
            merged.cells.append(_html_cell(f"<p class='bad'>{e(nb)}</p>"))
            continue
        if not merged.metadata.get("language_info"):
            merged.metadata.update(
                {k: nb.metadata[k] for k in ("kernelspec", "language_info") if k in nb.metadata}
            )
        merged.cells.extend(_shown(cell) for cell in nb.cells)
    for i, cell in enumerate(merged.cells):
        cell["id"] = f"cell-{i}"  # the same notebook twice (a failed attempt, then the run) repeats ids
    return merged


def render(root: Path) -> str:
    """The run's report as one HTML document."""
    # The chain's check re-reads every file on it, the artifact too (hashing releases the GIL):
    # it runs beside the render, whose page holds a random marker where its verdict goes.
    marker = f"imaging-audit-verdict-{secrets.token_hex(16)}"
    with ThreadPoolExecutor(1) as side:
        checking = side.submit(audit.verify, root)
        body = pages.render(assemble(root, marker), f"Run {root.name}")
        verdict = _audit_verdict(checking.result())
    return body.replace(marker, verdict, 1)


def write(root: Path) -> Path:
    """Write ``report.html`` into the run directory."""
    if not (root / "request.json").is_file():
        raise ParameterError(f"{root} is not a run: it has no request.json")
    page = root / "report.html"
    text = render(root)
    with atomic_path(page) as part:
        part.write_text(text, encoding="utf-8")
    return page


def runs(directory: Path) -> list[Path]:
    """Every run under ``directory``, newest change first."""
    found = [p for p in directory.iterdir() if p.is_dir() and (p / "request.json").is_file()]
    return sorted(
        found, key=lambda p: (str(_json(p / "state.json").get("updated", "")), p.name), reverse=True
    )


def write_index(directory: Path | None = None) -> Path:
    """Write ``index.html`` into the runs directory: every run, its state and artifact."""
    directory = directory or config.runs_dir()
    rows = []
    for root in runs(directory):
        state, result = _json(root / "state.json"), _json(root / "result.json")
        link = (
            f"<a href='{e(quote(root.name) + '/report.html')}'>{e(root.name)}</a>"
            if (root / "report.html").is_file()
            else f"{e(root.name)} (no report yet)"
        )
        boot = result.get("boot") or {}
        rows.append((
            link,
            e(state.get("state", "unknown")),
            e(state.get("stage") or ""),
            e(state.get("updated", "")),
            _code(result.get("path")),
            _code(result.get("sha256")),
            e(boot.get("verdict") or "-"),
        ))  # fmt: skip
    table = _table(rows, ("run", "state", "stage", "updated", "artifact", "sha256", "boot"))
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>imaging runs</title>"
        f"{_STYLE}<style>body {{ font-family: sans-serif; margin: 2em; }}</style></head>"
        f"<body class='imaging-report'><h1>Runs in {e(directory)}</h1>{table}</body></html>\n"
    )
    index = directory / "index.html"
    with atomic_path(index) as part:
        part.write_text(page, encoding="utf-8")
    return index
