"""Results that read well in three places: a notebook (a table), a terminal, and JSON."""

from __future__ import annotations

import dataclasses
import enum
import html
from pathlib import Path
from typing import Any

from imaging.tables import Table


def plain(value: Any) -> Any:
    """JSON-ready form of dataclasses, paths, enums, tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class Record:
    """Mixin for result dataclasses: ``to_dict()`` for the record, a two-column table for people."""

    def to_dict(self) -> dict[str, Any]:
        data = plain(self)
        assert isinstance(data, dict)
        return data

    def table(self) -> Table:
        rows = [
            (k, _cell(k, v))
            for k, v in self.to_dict().items()
            if not isinstance(v, dict | list) and not (isinstance(v, str) and "\n" in v)
        ]
        return Table(rows, ["", "value"], index="")

    def _repr_html_(self) -> str:
        return self.table().to_html()

    def __str__(self) -> str:
        return self.table().to_string()


def _cell(key: str, value: Any) -> Any:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (key.endswith("bytes") or key.endswith("size"))
    ):
        return f"{value:,} ({human_bytes(value)})"
    return value


class Text:
    """Text shown as it is (a serial log, a unified diff), in a notebook and in a terminal."""

    def __init__(self, text: str, empty: str = "(empty)") -> None:
        self.text = text if text.strip() else empty

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f"<pre style='white-space: pre-wrap'>{html.escape(self.text)}</pre>"


def diff(text: str) -> Text:
    """Show a unified diff (``(no change)`` when there is none)."""
    return Text(text, "(no change)")
