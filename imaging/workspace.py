"""The run directory: everything about one request lives under ``runs/<id>/``.

::

    runs/<id>/request.json     the resolved parameters of the run
              state.json       where the run is (running/failed/completed, stage, error, history)
              work/            images being built (sparse): instance.raw, esp.raw, disk.raw
              notebooks/       executed notebooks, one per completed stage (+ failed attempts)
              results/         each stage's result as JSON (what its notebook glued)
              commands.jsonl   every external command: argv, exit code, duration, stderr tail
              verify/          serial log of the boot check
              result.json      what the run produced
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imaging import config
from imaging.errors import ImagingError, ParameterError
from imaging.records import plain
from imaging.sparse import atomic_path


def write_json(path: Path, data: Any) -> None:
    """``path`` replaced whole, on disk under its name when this returns: the run's records are
    what the audit chain and a resumed run rely on, after a power cut too."""
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(json.dumps(plain(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], *, create: bool = True) -> Workspace:
        """``run_dir`` is a run id (under the runs directory) or a path."""
        text = os.fspath(run_dir)
        if not text:
            raise ParameterError("RUN_DIR is empty")
        path = Path(text)
        if not path.is_absolute() and len(path.parts) == 1:
            config.check_name(text)
            path = config.runs_dir() / text
        ws = cls(path.resolve())
        if create:
            for d in (ws.root, ws.work, ws.notebooks, ws.results):
                d.mkdir(parents=True, exist_ok=True)
        elif not ws.root.is_dir():
            raise ParameterError(f"no run at {ws.root}")
        return ws

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def instance(self) -> Path:
        return self.work / "instance.raw"

    @property
    def esp(self) -> Path:
        """The source's EFI system partition, copied whole (00-acquire), when it has one."""
        return self.work / "esp.raw"

    @property
    def disk(self) -> Path:
        return self.work / "disk.raw"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def verify(self) -> Path:
        return self.root / "verify"

    @property
    def commands_log(self) -> Path:
        return self.root / "commands.jsonl"

    @property
    def request_file(self) -> Path:
        return self.root / "request.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def result_file(self) -> Path:
        return self.root / "result.json"

    def result(self, stage: str) -> dict[str, Any]:
        path = self.results / f"{stage}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ImagingError(
                f"stage {stage} has not completed in run {self.id} yet: run it first"
            ) from None
        assert isinstance(data, dict)
        return data

    def has_result(self, stage: str) -> bool:
        return (self.results / f"{stage}.json").is_file()

    def save_result(self, stage: str, data: Any) -> None:
        write_json(self.results / f"{stage}.json", data)

    def request(self) -> dict[str, Any]:
        if not self.request_file.is_file():
            return {}
        data = json.loads(self.request_file.read_text(encoding="utf-8"))
        assert isinstance(data, dict)
        return data

    def __repr__(self) -> str:
        return f"Workspace({self.root})"
