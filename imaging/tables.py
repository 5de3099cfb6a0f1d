"""Tables for people: an HTML table in a notebook (and its HTML render), aligned text in a
terminal. What the stages showed with pandas, without importing pandas (and numpy) into every
stage's kernel: 0.3-0.5 s and ~40 MiB per stage, for tables of a few dozen rows."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


class Table:
    """Rows under named columns; ``index`` names the column whose values label the rows
    (shown first, as a row header, the way pandas shows an index)."""

    def __init__(
        self, rows: Sequence[Sequence[Any]], columns: Sequence[str], index: str | None = None
    ) -> None:
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]
        if any(len(r) != len(self.columns) for r in self.rows):
            raise ValueError(f"every row needs {len(self.columns)} cells ({', '.join(self.columns)})")
        if index is not None and index not in self.columns:
            raise ValueError(f"index {index!r} is not a column")
        self.index = index

    @classmethod
    def from_dicts(cls, rows: Sequence[dict[str, Any]]) -> Table:
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        return cls([[row.get(c, "") for c in columns] for row in rows], columns)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def cell(self, row: Any, column: str) -> Any:
        """The value in ``column`` of the row whose index value is ``row``."""
        if self.index is None:
            raise KeyError("the table has no index")
        keys = self.column(self.index)
        return self.rows[keys.index(row)][self.columns.index(column)]

    def to_html(self) -> str:
        def cells(tag: str, values: Sequence[Any], header_first: bool) -> str:
            out = []
            for n, v in enumerate(values):
                t = "th" if header_first and n == 0 else tag
                out.append(f"<{t}>{html.escape(str(v))}</{t}>")
            return "".join(out)

        order = self._order()
        head = cells("th", [self.columns[i] for i in order], False)
        body = "".join(
            f"<tr>{cells('td', [r[i] for i in order], self.index is not None)}</tr>" for r in self.rows
        )
        return f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_string(self) -> str:
        order = self._order()
        grid = [[self.columns[i] for i in order]] + [[str(r[i]) for i in order] for r in self.rows]
        widths = [max(len(line[c]) for line in grid) for c in range(len(order))]
        return "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in grid
        )

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return self.to_string()

    def _order(self) -> list[int]:
        first = [] if self.index is None else [self.columns.index(self.index)]
        return first + [i for i in range(len(self.columns)) if i not in first]
