"""imaging.tables: what the stages show, escaped, in HTML and as text."""

from __future__ import annotations

import pytest

from imaging.tables import Table


def test_html_escapes_every_cell_and_heading() -> None:
    table = Table([("<script>alert(1)</script>", "a&b")], ["path <x>", "change"])
    page = table._repr_html_()
    assert (
        "<script>" not in page
        and "&lt;script&gt;" in page
        and "a&amp;b" in page
        and "path &lt;x&gt;" in page
    )


def test_index_rows_and_columns() -> None:
    table = Table([("offset", "32,256 bytes"), ("block_total", "7 blocks")], ["", "value"], index="")
    assert table.cell("block_total", "value") == "7 blocks" and len(table) == 2
    assert "<th>offset</th><td>32,256 bytes</td>" in table.to_html()
    assert str(table).splitlines() == [
        "             value",
        "offset       32,256 bytes",
        "block_total  7 blocks",
    ]
    assert Table.from_dicts([{"a": 1}, {"b": 2}]).column("b") == ["", 2]
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        Table([("only one",)], ["a", "b"])
