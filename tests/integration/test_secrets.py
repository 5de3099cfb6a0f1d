"""The secret scan on a real Debian guest: every kind of secret users leave, in the places they
leave them, is found by 25-secrets; under the fail policy the run stops there, and no value is
in anything the run wrote (the instance's own disk aside)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from imaging.samples import catalog

from . import planted
from .conftest import Cli


def test_every_planted_secret_is_found_and_none_is_recorded(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "leaky-debian12.img"
    subprocess.run(["cp", "--sparse=always", str(catalog.ensure_sample("debian12")), str(image)], check=True)
    image.chmod(0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    items = planted.kinds()
    assert len({i.kind for i in items}) >= 20
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        planted.plant(mnt, items)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    proc = cli("export", str(image), "--name", "leaky", "--format", "raw", "--secrets", "fail", "--run", "leaky",
               check=False)  # fmt: skip
    run = cli.runs / "leaky"
    state = json.loads((run / "state.json").read_text())
    assert proc.returncode != 0 and (state["state"], state["stage"]) == ("error", "25-secrets"), proc.stderr
    assert "secret(s) found in the guest under policy fail" in state["error"]
    assert not (run / "notebooks" / "30-bootable.ipynb").exists()  # stopped before the disk is made

    # Every kind found, each file named in the failed attempt's notebook with its fingerprint.
    notebook = (run / "notebooks" / "25-secrets.failed-1.ipynb").read_text()
    missing = [i.kind for i in items if i.path not in notebook]
    assert missing == []
    assert "private key without passphrase" in notebook and "NPM tokens" in notebook

    # No value in any file of the run: notebooks, renders, state, logs, the command log.
    values = [v for i in items for v in i.values]
    for path in run.rglob("*"):
        if path.is_file() and path.suffix != ".raw":
            text = path.read_text(errors="replace")
            leaked = [v for v in values if v in text]
            assert leaked == [], f"{path} holds a planted secret"
    assert not any(v in proc.stderr + proc.stdout for v in values)
    shutil.rmtree(run / "work")
