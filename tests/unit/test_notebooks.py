"""The committed notebooks: clean (no outputs), one parameters cell, thin, and in step with the
pipeline's request fields."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import papermill as pm
import pytest

from imaging import config
from imaging.run import pipeline
from imaging.run.request import Request

NOTEBOOKS = sorted(config.notebooks_dir().glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    assert nb["metadata"]["kernelspec"]["name"] == pipeline.KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_then_thin_cells(path: Path) -> None:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    for cell in code:
        source = "".join(cell["source"])
        tree = ast.parse(source)  # also rejects IPython magics and shell escapes
        logic = (ast.FunctionDef, ast.ClassDef, ast.For, ast.While, ast.If, ast.Try, ast.With, ast.Lambda)
        assert not [n for n in ast.walk(tree) if isinstance(n, logic)], source
        assert "sh" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if "parameters" not in cell["metadata"].get("tags", []):
            statements = [n for n in tree.body if not isinstance(n, ast.Import | ast.ImportFrom)]
            assert len(statements) <= 3, source


def test_stage_parameters_are_request_fields() -> None:
    fields = {k.upper() for k in Request.model_fields} | {"RUN_DIR", "HASH_SOURCE", "DISPLAY_NAME"}
    for stage in {s for stages in config.load_defaults().pipelines.values() for s in stages}:
        declared = set(pm.inspect_notebook(str(pipeline.notebook_path(stage))))
        assert declared <= fields, (stage, declared - fields)


def test_explore_notebook_only_shows_panels() -> None:
    """explore.ipynb is no stage (the pipeline never runs it), so its parameters are its own; its
    cells build one panel each from imaging.explore.panels, where the logic lives."""
    path = config.notebooks_dir() / "explore.ipynb"
    assert set(pm.inspect_notebook(str(path))) == {"SOURCE", "NAME", "TARGET", "FORMAT", "RUN", "OPEN_FILE",
                                                   "RUN_STAGES"}  # fmt: skip
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" not in cell["metadata"].get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            assert names & {"panels", "explorer"}, cell["source"]
            imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert imports <= {"imaging.explore"}, imports
