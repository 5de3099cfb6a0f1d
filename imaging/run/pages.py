"""Executed notebooks as HTML pages: one nbconvert exporter per process, for every stage's page
and the run's report.

nbconvert compiles its Jinja templates once per exporter: 0.3-0.4 s here, where rendering a
stage's notebook with compiled templates takes 0.05-0.1 s. A fresh exporter per page paid that
for every stage and again for the report, all of it on the pipeline's path. One exporter, made
on first use and used under a lock (it keeps per-render state), pays it once.

The template is nbconvert's lab template without its scripts: require.js, MathJax and mermaid
come from CDNs, and an auditor's copy must read the same offline. Input of cells tagged
``HIDDEN`` is left out (the report's own cells of headings and tables).
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

HIDDEN = "imaging-report"
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_lock = threading.Lock()


@functools.cache  # made under _lock
def _exporter() -> Any:
    import jinja2
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    settings = Config()
    settings.TagRemovePreprocessor.enabled = True
    settings.TagRemovePreprocessor.remove_input_tags = {HIDDEN}
    return HTMLExporter(
        config=settings,
        template_name="lab",
        template_file="imaging.html.j2",
        extra_loaders=[jinja2.DictLoader({"imaging.html.j2": _TEMPLATE})],
        embed_images=True,
        exclude_anchor_links=True,
    )


def warm() -> None:
    """Make the exporter and compile its templates now (a notebook of one cell of each kind),
    on a thread while the pipeline waits for a kernel, not when a stage's page is due."""
    import nbformat

    v4 = nbformat.v4
    cell = v4.new_code_cell("1", outputs=[v4.new_output("execute_result", data={"text/plain": "1"})])
    render(v4.new_notebook(cells=[v4.new_markdown_cell("#"), cell]), "warm")


def render(nb: Any, title: str) -> str:
    """The HTML page of the notebook ``nb`` (an ``nbformat.NotebookNode``), titled ``title``."""
    with _lock, warnings.catch_warnings():
        # A stage's recorded result (scraps.MIME) has no HTML form, by design: its tables show it.
        warnings.filterwarnings("ignore", message=".*scrapbook.scrap.json.*not able to be represented")
        body, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": title}})
    return str(body)
