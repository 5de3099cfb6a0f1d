"""The manual's generated parts, made from the code each time the docs are built.

Nothing here is copied by hand into a page: the clean operations come from their registry
(``imaging.guest.clean.operations_table``), the profiles from ``parameters/profiles/``, the
command-line reference from ``imaging.cli.build_parser``, the HTTP API from the OpenAPI
description of the FastAPI app (``imaging.service.api.create_app``), and the catalogue of error
messages from the ``raise`` statements in ``imaging/``. Each is written as Markdown under
``docs/_generated/`` (ignored by git) and included by the page that explains it.

The extension also declares the ``cleanop`` object type: a ``{cleanop}`` directive is a clean
operation's entry in the manual, and the generated table links every operation to its entry, so
an operation without one is a warning (and ``make docs`` fails).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parents[2]
# A database URL is needed to build the app; nothing connects to it while the description is made.
DOCS_DATABASE = "postgresql+psycopg://docs@localhost/docs"


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_object_type(
        "cleanop", "cleanop", objname="clean operation", indextemplate="pair: %s; clean operation"
    )
    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


def generate(app: Sphinx) -> None:
    out = Path(app.srcdir) / "_generated"
    spec = openapi_spec()
    pages = {
        "clean-operations.md": clean_operations_md(),
        "profiles.md": profiles_md(),
        "commands.md": commands_md(),
        "openapi.json": json.dumps(spec, indent=1) + "\n",
        "api.md": api_md(spec),
        "errors.md": errors_md(),
    }
    for name, text in pages.items():
        write_if_changed(out / name, text)


def write_if_changed(path: Path, text: str) -> None:
    """Written only when it changed (Sphinx rereads the pages that include it), and atomically:
    two builds at once (make docs, the docs test) never read half a file."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cell(value: object) -> str:
    """A value for a Markdown table cell."""
    text = " ".join(str(value).split())
    for special in ("\\", "|", "<", "*", "_", "`", "[", "]"):
        text = text.replace(special, "\\" + special)
    return text


def code(value: object) -> str:
    text = str(value)
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# Clean operations ---------------------------------------------------------------------------------


def clean_operations_md() -> str:
    from imaging.guest import clean

    ops = clean.operations_table()
    rows = [
        [f"{{cleanop}}`{name}`", "yes" if default else "", cell(heading)]
        for name, default, heading in ops.rows
    ]
    return table(["operation", "by default", "what it does"], rows)


# Profiles -----------------------------------------------------------------------------------------


def profiles_md() -> str:
    from imaging import config
    from imaging.guest import profiles

    rows = []
    for name in config.available("profiles"):
        p = profiles.load_profile(name)
        ids = ", ".join(
            f"{i} {' '.join(v) if v else '(any version)'}"
            for i, v in (p.os_release.ids if p.os_release else {}).items()
        )
        if p.os_release and p.os_release.like:
            ids += f"; like {', '.join(p.os_release.like)}"
        detect = "; ".join(
            f"{code(r.file)} matches {code(r.matches)}" if r.matches else f"{code(r.file)} exists"
            for r in p.detect
        )
        tools = [
            Path(p.initrd.tool).name if p.initrd else "initrd kept",
            p.packages.install[0] if p.packages else "",
        ]
        uefi = "yes" if p.efi.boots else "no"
        rows.append(
            [
                code(name) + (f" (on {code(p.base)})" if p.base else ""),
                cell(p.description),
                cell(ids or "-"),
                detect or "-",
                cell(", ".join(x for x in tools if x)),
                uefi,
            ]
        )
    header = [
        "profile",
        "for",
        "os-release IDs and versions",
        "else detected by",
        "initrd, packages",
        "UEFI",
    ]
    return table(header, rows)


# The command line ---------------------------------------------------------------------------------


def commands() -> dict[str, argparse.ArgumentParser]:
    from imaging.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(command: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in command._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def commands_md() -> str:
    from imaging.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    parts = []
    for name, command in commands().items():
        program = f"imaging {name}"
        usage = " ".join(command.format_usage().split()).removeprefix("usage: ")
        usage = usage.replace("python -m imaging", "imaging", 1)
        parts.append(f"## `{program}`\n\n{helps.get(name, '')}\n\n```text\n{usage}\n```\n")
        rows = []
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                opt = max(action.option_strings, key=len)
                what = f"{{option}}`{opt} <{program} {opt}>`"
            else:
                what = code(action.metavar or action.dest)
            takes = ""
            if action.choices:
                takes = " \\| ".join(code(c) for c in action.choices)
            elif action.option_strings and action.nargs != 0:
                takes = code(action.metavar or action.dest.upper())
            rows.append([what, takes, cell(action.help or "")])
        if rows:
            parts.append(table(["option", "takes", "what"], rows))
    return "\n".join(parts)


# The HTTP API -------------------------------------------------------------------------------------


def openapi_spec() -> dict[str, Any]:
    """The service's OpenAPI description, as ``GET /openapi.json`` serves it (with no instances
    configured: a site's own list of instances is in its own description)."""
    from imaging.service import api, settings

    with tempfile.TemporaryDirectory(prefix="imaging-docs-") as state:
        loaded = settings.Settings(state_dir=Path(state), database_url=SecretStr(DOCS_DATABASE))
        app = api.create_app(loaded, recover=False)
        try:
            return app.openapi()
        finally:
            app.state.store.close()


def _ref(schema: dict[str, Any]) -> str:
    return schema["$ref"].rsplit("/", 1)[-1]


def schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = _ref(schema)
        return f"{{ref}}`{name} <api-schema-{name.lower()}>`"
    if "anyOf" in schema:
        kinds = [schema_type(s) for s in schema["anyOf"]]
        return " or ".join(kinds)
    if "enum" in schema:
        return " \\| ".join(code(v) for v in schema["enum"])
    if "const" in schema:
        return code(schema["const"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {schema_type(schema.get('items', {}))}"
    extra = schema.get("additionalProperties")
    if kind == "object" and isinstance(extra, dict) and extra:
        return f"object of {schema_type(extra)}"
    return str(kind)


def constraints(schema: dict[str, Any]) -> str:
    found = []
    for s in [schema, *schema.get("anyOf", [])]:
        for key, label in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                           ("maxItems", "at most {} items"), ("pattern", "matches {}"),
                           ("minimum", ">= {}"), ("maximum", "<= {}")):  # fmt: skip
            if key in s:
                found.append(label.format(code(s[key]) if key == "pattern" else s[key]))
    if "default" in schema and schema["default"] is not None:
        found.append(f"default {code(json.dumps(schema['default']))}")
    return "; ".join(found)


def api_md(spec: dict[str, Any]) -> str:
    parts = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"### `{method.upper()} {path}`\n\n{op.get('summary', '')}\n")
            if op.get("description"):
                parts.append(f"{op['description']}\n")
            who = "a user's bearer token" if op.get("security") else "no bearer token"
            parts.append(f"Authentication: {who}.\n")
            params = op.get("parameters", [])
            if params:
                rows = [
                    [code(p["name"]), p["in"], schema_type(p.get("schema", {})), "yes" if p.get("required") else "",
                     cell(p.get("description", ""))]
                    for p in params
                ]  # fmt: skip
                parts.append(table(["parameter", "in", "type", "required", "description"], rows))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(f"Body (JSON): {schema_type(body)}.\n")
            rows = []
            for status, response in op["responses"].items():
                content = response.get("content", {})
                kinds = []
                for mime, media in content.items():
                    schema = media.get("schema", {})
                    kinds.append(f"{code(mime)} {schema_type(schema) if schema else ''}".strip())
                rows.append([code(status), cell(response.get("description", "")), ", ".join(kinds)])
            parts.append(table(["status", "meaning", "body"], rows))
    parts.append("## Schemas\n")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(f"(api-schema-{name.lower()})=\n### `{name}`\n")
        if schema.get("description"):
            parts.append(f"{' '.join(schema['description'].split())}\n")
        if "enum" in schema:
            parts.append(f"One of: {schema_type(schema)}.\n")
            continue
        required = set(schema.get("required", []))
        rows = [
            [code(field), schema_type(s), "yes" if field in required else "",
             "; ".join(x for x in (cell(s.get("description", "")), constraints(s)) if x)]
            for field, s in schema.get("properties", {}).items()
        ]  # fmt: skip
        if rows:
            parts.append(table(["field", "type", "required", "description"], rows))
    return "\n".join(parts)


# Error messages -----------------------------------------------------------------------------------


def error_families(tree: dict[Path, ast.Module]) -> dict[str, str]:
    """Every exception class of the product (subclasses of ImagingError), with its family:
    the class in imaging/errors.py it derives from."""
    bases: dict[str, list[str]] = {}
    for module in tree.values():
        for node in ast.walk(module):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, []).extend(ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases)
    direct = {"ImagingError"} | {n for n, b in bases.items() if "ImagingError" in b and n != "ImagingError"}

    def family(name: str, seen: frozenset[str] = frozenset()) -> str | None:
        if name == "ImagingError":
            return name
        for base in bases.get(name, []):
            if base in seen:
                continue
            found = family(base, seen | {name})
            if found:
                return name if found == "ImagingError" and name in direct else found
        return None

    return {n: f for n in bases if (f := family(n))}


def message_template(node: ast.expr) -> str | None:
    """The text of a message, its interpolated values shown as ``<name>`` (or ``...``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            elif isinstance(part, ast.FormattedValue):
                value = part.value
                if isinstance(value, ast.Name):
                    out.append(f"<{value.id}>")
                elif isinstance(value, ast.Attribute):
                    out.append(f"<{value.attr}>")
                else:
                    out.append("...")
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = message_template(node.left), message_template(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def error_messages() -> list[tuple[str, str, str]]:
    """(family, module, message) of every ``raise`` of the product's errors with a message."""
    files = sorted((ROOT / "imaging").rglob("*.py"))
    tree = {f: ast.parse(f.read_text(encoding="utf-8")) for f in files}
    families = error_families(tree)
    found = []
    for path, module in tree.items():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(module):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            cls = ast.unparse(node.exc.func).rsplit(".", 1)[-1]
            if cls not in families:
                continue
            text = message_template(node.exc.args[0])
            if text:
                found.append((families[cls], name, " ".join(text.split())))
    return sorted(set(found))


def errors_md() -> str:
    by_family: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for family, module, message in error_messages():
        by_family[family].append((module, message))
    parts = []
    for family in sorted(by_family):
        rows = [[code(message), code(module)] for module, message in by_family[family]]
        parts.append(f"### `{family}` ({len(rows)} messages)\n\n" + table(["message", "from"], rows))
    return "\n".join(parts)
