"""A stage's result, recorded in its executed notebook and read back by the pipeline.

The format is scrapbook's (a display output of MIME type
``application/scrapbook.scrap.json+json`` holding ``{name, data, encoder, version}``), so
``scrapbook.read_notebook(path).scraps`` reads our notebooks too. We write and read it ourselves
because scrapbook (no release since 2021) needs an undeclared ``six`` and pulls pyarrow into every
process that imports it, about 50 MiB each in the pipeline and in every kernel, for these two
functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIME = "application/scrapbook.scrap.json+json"


def glue(name: str, data: Any) -> None:
    """Record ``data`` (JSON-able) under ``name`` in the running notebook, without showing it."""
    from IPython.display import display

    payload = {"name": name, "data": data, "encoder": "json", "version": 1}
    display(
        {MIME: payload}, metadata={"scrapbook": {"name": name, "data": True, "display": False}}, raw=True
    )


def read(notebook: Path) -> dict[str, Any]:
    """Every scrap in an executed notebook, by name (the last one wins, as in scrapbook)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            payload = output.get("data", {}).get(MIME)
            if isinstance(payload, dict) and "name" in payload:
                found[str(payload["name"])] = payload.get("data")
    return found
