"""Record the manual's example of an audit record, ``docs/audit-example/`` (``make docs-example``).

    python docs/record_example.py            export the kvm sample (root; boots it), record its run
    python docs/record_example.py RUN_DIR    record a completed run of the export pipeline

The HTML renders of the run's executed notebooks (on its audit chain beside the notebooks, which
the repository keeps only without outputs), ``request.json``, ``state.json``, ``result.json`` and
``audit.json`` are copied as the run wrote them, so each file's sha256 is still the one on the
run's audit chain (tests/unit/test_docs.py checks it). The renders go where the manual's build
copies them as they are (``html_extra_path``): ``audit-example/notebooks/<stage>.html``. The
artifact is not copied.
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
RENDERS = EXAMPLE / "html" / "audit-example" / "notebooks"
RECORDED = ("request.json", "state.json", "result.json", "audit.json")
EXPORT = ["export", "sample:kvm", "--name", "demo", "--format", "qcow2", "--target", "kvm"]


def record(run: Path) -> None:
    state = json.loads((run / "state.json").read_text())
    if state.get("state") != "completed":
        sys.exit(f"record_example: {run} is not a completed run ({state.get('state')})")
    renders = sorted(p for p in (run / "notebooks").glob("*.html") if "." not in p.stem)
    shutil.rmtree(EXAMPLE / "notebooks", ignore_errors=True)
    shutil.rmtree(RENDERS, ignore_errors=True)
    RENDERS.mkdir(parents=True)
    for page in renders:
        shutil.copy2(page, RENDERS / page.name)
    for name in RECORDED:
        shutil.copy2(run / name, EXAMPLE / name)
    print(f"record_example: {run.name}: {len(renders)} notebooks -> {EXAMPLE}", file=sys.stderr)


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
