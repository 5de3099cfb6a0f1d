"""Sphinx configuration of the manual (``make docs``; tests/unit/test_docs.py builds it too)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]  # the imaging package; the manual's extension

from imaging import __version__  # noqa: E402

project = "imaging"
author = "the imaging project"
copyright = "the imaging project"
version = release = __version__

extensions = ["myst_nb", "imaging_docs"]
exclude_patterns = ["_build", "_generated", "audit-example/html", "**.ipynb_checkpoints", "Thumbs.db",
                    ".DS_Store"]  # fmt: skip
# The recorded run's notebooks are its own HTML renders, copied into the build as they are
# (audit-example/notebooks/<stage>.html): executing the stages needs root, loop devices and a
# boot under QEMU, and the repository keeps notebooks without outputs (see audit-example/index.md).
html_extra_path = ["audit-example/html"]
nb_execution_mode = "off"
nb_merge_streams = True
# What scrapbook glued for the pipeline (application/scrapbook.scrap.json+json) is data for the
# next stages, not for a reader: myst-nb has no renderer for it and skips it, saying so.
suppress_warnings = ["mystnb.unknown_mime_type"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Options are written --name: never an en dash.
smartquotes = False

html_theme = "furo"
html_title = f"imaging {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_last_updated_fmt = None
pygments_style = "sphinx"
# Every reference must resolve: a clean operation or an option without its entry is a warning.
nitpicky = True
