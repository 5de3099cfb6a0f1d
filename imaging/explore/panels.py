"""The widgets of notebooks/explore.ipynb: one panel per step, each a thin face on
:mod:`imaging.explore.steps`.

Every panel belongs to an :class:`Explorer`, which holds the session (the run being explored)
and refreshes every panel when the session changes: another image opened, a stage run. Each
user action is a plain method (``go``, ``show``, ``choose``, ``run_next``...) that the widget's
callback calls, so tests drive the panels without a browser. An action that fails shows its
one-line error in the panel instead of losing it in the kernel's log.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from IPython.display import display

from imaging import config
from imaging.errors import GuestError, ImagingError
from imaging.explore import steps
from imaging.guest import clean
from imaging.run import scraps
from imaging.tables import Table


def _pre(text: str) -> str:
    return f"<pre style='white-space: pre-wrap; max-height: 30em; overflow: auto'>{html.escape(text)}</pre>"


def _table(rows: list[dict[str, Any]] | Table) -> str:
    return (rows if isinstance(rows, Table) else Table.from_dicts(rows)).to_html()


def _error(e: Exception) -> str:
    return f"<p style='color: #b00'>{html.escape(str(e))}</p>"


class Explorer:
    """The session every panel shows, and what the panels found (recorded by :meth:`run`)."""

    def __init__(self, session: steps.Session) -> None:
        self.session = session
        self.panels: list[Panel] = []
        self.seen: dict[str, Any] = {}

    @classmethod
    def open(cls, source: str, *, name: str, target: str, image_format: str, run: str = "") -> Explorer:
        session = steps.Session.open(source, name=name, target=target, image_format=image_format, run=run)
        return cls(session)

    def reopen(self, session: steps.Session) -> None:
        self.session = session
        self.seen.clear()
        self.refresh()

    def refresh(self) -> None:
        for panel in self.panels:
            panel.refresh()

    def run(self, until: str = "all") -> dict[str, Any] | None:
        """Run the stages ``until`` asks for, one at a time; the run's result once all are done."""
        for stage in self.session.run_stages(until):
            self.seen.setdefault("stages_run", []).append(stage)
        self.refresh()
        result = self.session.finish()
        scraps.glue("explore", {"run": self.session.ws.id, **self.seen, "result": result})
        return result


class Panel:
    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer
        self.message = w.HTML()
        self.widget: w.Widget = self.message
        explorer.panels.append(self)

    @property
    def session(self) -> steps.Session:
        return self.explorer.session

    def refresh(self) -> None:
        """Show the session as it is now."""

    def attempt(self, action: Callable[[], object]) -> bool:
        self.message.value = ""
        try:
            action()
        except ImagingError as e:
            self.message.value = _error(e)
            return False
        return True

    def _ipython_display_(self) -> None:
        display(self.widget)


class SourcePanel(Panel):
    """Which image: a sample, a local file or an existing run; opening one runs 00-acquire."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        request = self.session.request
        runs = sorted((p.parent.name for p in config.runs_dir().glob("*/request.json")), reverse=True)
        self.kind = w.ToggleButtons(options=["sample", "file", "run"], value="sample")
        self.sample = w.Dropdown(options=["sample:xen", "sample:kvm"], description="sample")
        self.file = w.Text(placeholder="/path/to/instance.img", description="file")
        self.runs = w.Dropdown(options=runs, description="run")
        self.name = w.Text(value=request.name, description="name")
        self.target = w.Dropdown(
            options=config.available("targets"), value=request.target, description="target"
        )
        self.format = w.Dropdown(options=[f.value for f in config.ImageFormat], value=request.format,
                                 description="format")  # fmt: skip
        button = w.Button(description="Open", button_style="primary")
        button.on_click(lambda _: self.open_chosen())
        self.status = w.HTML()
        self.widget = w.VBox([self.kind, self.sample, self.file, self.runs, w.HBox([self.name, self.target]),
                               self.format, button, self.message, self.status])  # fmt: skip
        self.refresh()

    def open_chosen(self) -> bool:
        source = {"sample": self.sample.value, "file": self.file.value.strip(), "run": ""}[self.kind.value]
        run = self.runs.value if self.kind.value == "run" else ""
        return self.attempt(lambda: self.explorer.reopen(steps.Session.open(
            source, name=self.name.value, target=self.target.value, image_format=self.format.value,
            run=run or "")))  # fmt: skip

    def refresh(self) -> None:
        r = self.session.request
        self.status.value = (
            f"<p>run <b>{html.escape(self.session.ws.id)}</b> in {html.escape(str(self.session.ws.root))}: "
            f"{html.escape(r.source)} &rarr; {r.format} for {r.target}</p>"
        )


class TreePanel(Panel):
    """The guest's files, read-only, never leaving the guest: a directory, then a file."""

    def __init__(self, explorer: Explorer, path: str = "/", open_file: str = "") -> None:
        super().__init__(explorer)
        self.path = w.Text(value=path, description="path")
        go = w.Button(description="Go")
        go.on_click(lambda _: self.choose(self.path.value))
        self.entries = w.Select(options=[], rows=14, layout=w.Layout(width="100%"))
        self.entries.observe(
            lambda change: self.choose(change["new"]) if change["new"] else None, names="value"
        )
        self.content = w.HTML()
        self.widget = w.VBox([w.HBox([self.path, go]), self.message, self.entries, self.content])
        self.go(path)
        if open_file:
            self.show(open_file)

    def go(self, path: str) -> bool:
        def list_it() -> None:
            listing = self.session.list_dir(path)
            up = steps.guest_path(listing.path + "/..")
            options = [(f"{'..':<4} (up to {up})", up)] + [(_label(e), e.path) for e in listing.entries]
            self.path.value = listing.path
            self.entries.unobserve_all("value")
            self.entries.options = options
            self.entries.value = None
            self.entries.observe(lambda c: self.choose(c["new"]) if c["new"] else None, names="value")
            more = listing.total - len(listing.entries)
            self.content.value = f"<p>{more:,} more entries not listed</p>" if more > 0 else ""

        return self.attempt(list_it)

    def show(self, path: str) -> steps.FileView | None:
        shown: list[steps.FileView] = []

        def view() -> None:
            v = self.session.view_file(path)
            real = f" &rarr; {html.escape(v.real)}" if v.real != v.path else ""
            self.content.value = f"<p><b>{html.escape(v.path)}</b>{real}: {html.escape(v.note)}</p>" + (
                _pre(v.text) if v.text else ""
            )
            shown.append(v)

        self.attempt(view)
        return shown[0] if shown else None

    def choose(self, path: str) -> None:
        """A directory is listed, anything else shown."""
        v = self.show(path)
        if v is not None and v.is_dir:
            self.go(path)

    def refresh(self) -> None:
        self.go(self.path.value)


def _label(e: steps.Entry) -> str:
    mark = {"directory": "d", "file": "-", "symlink": "l"}.get(e.kind, "?")
    link = f" -> {e.link}" if e.link else ""
    size = f"{e.size:>10,}" if e.kind == "file" else " " * 10
    return f"{mark} {e.mode} {size}  {e.name}{'/' if e.kind == 'directory' else ''}{link}"


class ProfilePanel(Panel):
    """The profile the stages will use and why; a proposed new one when no profile knows the guest,
    or one only assumed it (or generic was asked for)."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        self.found = w.HTML()
        self.proposal = w.HTML()
        button = w.Button(description="Propose a profile")
        button.on_click(lambda _: self.propose())
        self.widget = w.VBox([self.found, self.message, button, self.proposal])
        self.refresh()

    def refresh(self) -> None:
        def detect() -> None:
            try:
                detected, rules = self.session.detected()
            except GuestError as e:  # no profile knows the guest: propose one from what it holds
                self.found.value = f"<p>{html.escape(str(e))}</p>"
                self.explorer.seen["profile"] = {"name": None, "reason": str(e)}
                self.propose()
                return
            rows = [
                {"profile": r.profile, "rule": r.rule, "holds": "yes" if r.holds else "no"} for r in rules
            ]
            warning = f"<p><b>Warning</b>: profile assumed: {html.escape(detected.assumed)}</p>" * bool(
                detected.assumed
            )
            self.found.value = (
                f"<p>profile <b>{detected.profile.name}</b> ({html.escape(detected.profile.description)}): "
                f"{html.escape(detected.reason)}</p>" + warning + _table(rows)
            )
            self.explorer.seen["profile"] = {"name": detected.profile.name, "reason": detected.reason,
                                             "assumed": detected.assumed}  # fmt: skip
            self.proposal.value = ""
            # A guest the profile only half knows gets a profile of its own to review, built on it.
            if detected.profile.name == "generic" or detected.assumed:
                self.propose()

        self.attempt(detect)

    def propose(self) -> str:
        text: list[str] = []

        def make() -> None:
            text.append(self.session.proposal())
            self.proposal.value = "<p>A profile proposed from what the guest holds (review it):</p>" + _pre(
                text[0]
            )

        self.attempt(make)
        return text[0] if text else ""


class CleanPanel(Panel):
    """The clean operations as switches; every change plans again (a dry run)."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        table = clean.operations_table()
        self.boxes = {
            op: w.Checkbox(description=f"{op}: {heading}", indent=False, layout=w.Layout(width="32em"))
            for op, heading in zip(table.column("operation"), table.column("heading"), strict=True)
        }
        for box in self.boxes.values():
            box.observe(lambda _: self._toggled(), names="value")
        self.plan = w.HTML()
        self._quiet = False
        self.widget = w.VBox([w.GridBox(list(self.boxes.values()),
                                         layout=w.Layout(grid_template_columns="repeat(2, 32em)")),
                               self.message, self.plan])  # fmt: skip
        self.refresh()

    def _toggled(self) -> None:
        if not self._quiet:
            self.choose([op for op, box in self.boxes.items() if box.value])

    def choose(self, operations: list[str]) -> bool:
        """Make these the operations 10-clean runs, and show the new plan."""
        return self.attempt(lambda: self.session.choose_clean(operations)) and self._show_plan()

    def refresh(self) -> None:
        def load() -> None:
            _, chosen = self.session.clean_operations()
            self._quiet = True
            try:
                for op, box in self.boxes.items():
                    box.value = op in chosen
                    box.disabled = self.session.runner.done("10-clean")
            finally:
                self._quiet = False

        if self.session.runner.done("10-clean"):
            done = self.session.ws.result("10-clean")
            self.plan.value = "<p>10-clean has run; what it did:</p>" + _table(
                [{k: a[k] for k in ("op", "path", "action", "bytes")} for a in done["actions"]]
            )
            self._quiet = True
            for box in self.boxes.values():
                box.disabled = True
            self._quiet = False
            return
        if self.attempt(load):
            self._show_plan()

    def _show_plan(self) -> bool:
        def plan() -> None:
            p = self.session.clean_plan()
            self.plan.value = (
                f"<p>dry run: {len(p.actions)} actions by {len(p.operations)} operations "
                f"(request: clean {html.escape(str(self.session.request.clean))})</p>"
                + _table(p.table())
                + _pre(p.diff() or "(no edits)")
            )
            self.explorer.seen["clean"] = {"operations": p.operations, "actions": len(p.actions)}

        return self.attempt(plan)


class MigratePanel(Panel):
    """The target, and every change 20-migrate will make for it, as diffs, before it runs."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        self.target = w.Dropdown(options=config.available("targets"), value=self.session.request.target,
                                 description="target")  # fmt: skip
        self.target.observe(lambda c: self.choose(c["new"]), names="value")
        self.plan = w.HTML()
        self.widget = w.VBox([self.target, self.message, self.plan])
        self.refresh()

    def choose(self, target: str) -> bool:
        return self.attempt(lambda: self.session.choose_target(target)) and self._show_plan()

    def refresh(self) -> None:
        self.target.disabled = self.session.runner.done("20-migrate")
        if self.session.runner.done("20-migrate"):
            changes = self.session.ws.result("20-migrate")["changes"]
            self.plan.value = "<p>20-migrate has run; the changes it made:</p>" + _pre(
                "".join(c["diff"] for c in changes)
            )
            return
        self._show_plan()

    def _show_plan(self) -> bool:
        def plan() -> None:
            p = self.session.migration_plan()
            self.plan.value = (
                f"<p>for <b>{p.target}</b>, kernel {html.escape(p.kernel)}, initrd with "
                f"{html.escape(', '.join(p.initrd_modules))}; profile {p.profile}</p>"
                + _table(p.table())
                + _pre(p.diff())
            )
            self.explorer.seen["migrate"] = {"target": p.target, "changes": [c.path for c in p.changes]}

        return self.attempt(plan)


class SecretsPanel(Panel):
    """25-secrets' findings, before it runs: per file a button that removes it from the instance,
    per finding one that allows it by its fingerprint."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        scan = w.Button(description="Scan again")
        scan.on_click(lambda _: self.refresh())
        self.summary = w.HTML()
        self.rows = w.VBox()
        self.widget = w.VBox([scan, self.message, self.summary, self.rows])
        self.refresh()

    def refresh(self) -> None:
        def show() -> None:
            if self.session.runner.done("25-secrets"):
                done = self.session.ws.result("25-secrets")
                self.summary.value = "<p>25-secrets has run; what it found:</p>" + _table(
                    [
                        {k: f[k] for k in ("path", "line", "detector", "fingerprint")}
                        for f in done["findings"]
                    ]
                )
                self.rows.children = []
                return
            found = self.session.secret_scan()
            self.summary.value = (f"<p>{len(found.findings)} findings, {len(found.open)} open, policy "
                                  f"{html.escape(found.policy)}</p>") + found.summary().to_html()  # fmt: skip
            self.rows.children = [self._row(f, found) for f in found.findings]
            self.explorer.seen["secrets"] = {"findings": len(found.findings), "open": len(found.open)}

        self.attempt(show)

    def _row(self, f: Any, found: Any) -> w.Widget:
        remove = w.Button(description="Remove file", button_style="danger", tooltip=f.path)
        remove.on_click(lambda _: self.remove(f.path))
        allow = w.Button(description="Allowed" if f.fingerprint in found.allowed else "Allow",
                         disabled=f.fingerprint in found.allowed, tooltip=f.fingerprint)  # fmt: skip
        allow.on_click(lambda _: self.allow(f.fingerprint))
        label = w.HTML(f"<code>{html.escape(f.path)}:{f.line}</code> {html.escape(f.detector)} "
                       f"<code>{f.fingerprint}</code>")  # fmt: skip
        return w.HBox([remove, allow, label])

    def remove(self, path: str) -> bool:
        """Remove ``path`` from the instance, then scan again."""
        ok = self.attempt(lambda: self.session.remove_secret_file(path))
        if ok:
            self.refresh()
        return ok

    def allow(self, fingerprint: str) -> bool:
        ok = self.attempt(lambda: self.session.allow_secret(fingerprint))
        if ok:
            self.refresh()
        return ok


class StagesPanel(Panel):
    """The run's stages: which are done, and buttons that run the next one or all the rest."""

    def __init__(self, explorer: Explorer) -> None:
        super().__init__(explorer)
        self.table = w.HTML()
        self.log = w.Output()
        step = w.Button(description="Run next stage", button_style="primary")
        step.on_click(lambda _: self.run_next())
        rest = w.Button(description="Run all remaining")
        rest.on_click(lambda _: self.run_all())
        self.widget = w.VBox([w.HBox([step, rest]), self.message, self.table, self.log])
        self.refresh()

    def run_next(self) -> bool:
        """Run the next stage; its progress goes to the panel's log."""
        with self.log:
            ok = self.attempt(self._step)
        self.explorer.refresh()
        return ok

    def _step(self) -> None:
        self.session.run_next()

    def run_all(self) -> bool:
        with self.log:
            return self.attempt(self._rest)

    def _rest(self) -> None:
        self.explorer.run("all")

    def refresh(self) -> None:
        result = self.session.finish()
        done = ""
        if result is not None:
            boot = result.get("boot") or {}
            done = (f"<p>done: <b>{html.escape(str(result['path']))}</b> sha256 {result['sha256']}, "
                    f"boot {html.escape(str(boot.get('verdict')))}</p>")  # fmt: skip
        self.table.value = _table(self.session.status()) + done
