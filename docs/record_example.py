"""Record the manual's example of an audit record, ``docs/audit-example/`` (``make docs-example``).

    python docs/record_example.py            export the kvm sample (root; boots it), record its run
    python docs/record_example.py RUN_DIR    record a completed run of the export pipeline

The run's executed notebooks, ``request.json``, ``state.json``, ``result.json`` and ``audit.json``
are copied as the run wrote them, so each file's sha256 is still the one on the run's audit chain
(tests/unit/test_docs.py checks it). The artifact is not copied.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "audit-example"
RECORDED = ("request.json", "state.json", "result.json", "audit.json")
EXPORT = ["export", "sample:kvm", "--name", "demo", "--format", "qcow2", "--target", "kvm"]


def record(run: Path) -> None:
    state = json.loads((run / "state.json").read_text())
    if state.get("state") != "completed":
        sys.exit(f"record_example: {run} is not a completed run ({state.get('state')})")
    notebooks = sorted(p for p in (run / "notebooks").glob("*.ipynb") if "." not in p.stem)
    target = EXAMPLE / "notebooks"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for nb in notebooks:
        shutil.copy2(nb, target / nb.name)
    for name in RECORDED:
        shutil.copy2(run / name, EXAMPLE / name)
    print(f"record_example: {run.name}: {len(notebooks)} notebooks -> {EXAMPLE}", file=sys.stderr)


def export_and_record() -> None:
    with tempfile.TemporaryDirectory(prefix="imaging-docs-example-") as tmp:
        env = {**os.environ, "IMAGING_RUNS": str(Path(tmp) / "runs"), "IMAGING_PROGRESS": "0"}
        argv = [sys.executable, "-m", "imaging", *EXPORT, "--out", str(Path(tmp) / "out")]
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"record_example: the export failed (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        record(Path(result["run_dir"]))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        record(Path(sys.argv[1]).resolve())
    else:
        export_and_record()
