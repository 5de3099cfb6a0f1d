"""explore.ipynb, headless with its defaults, converts the Xen sample stage by stage and boots
it; and its panels answer clicks (their handlers called here, as a widget's callback would)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import papermill as pm
import pytest

from imaging import config
from imaging.explore import panels, steps
from imaging.guest import access
from imaging.run import pipeline, scraps

from .conftest import Cli
from .test_report import seen

pytestmark = pytest.mark.integration


def test_explore_notebook_converts_the_xen_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "explore.ipynb"
    t0 = time.monotonic()
    pm.execute_notebook(str(config.notebooks_dir() / "explore.ipynb"), str(out), kernel_name=pipeline.KERNEL_NAME,
                        cwd=str(config.PROJECT), progress_bar=False)  # fmt: skip
    seconds = time.monotonic() - t0
    shown = scraps.read(out)["explore"]
    assert shown["profile"]["name"] == "centos5" and "redhat-release" in shown["profile"]["reason"]
    assert shown["clean"]["actions"] > 10
    assert "/etc/inittab" in shown["migrate"]["changes"] and shown["migrate"]["target"] == "virtualbox"
    result = shown["result"]
    assert result["verified"] is True and result["boot"]["verdict"] == "booted" and result["format"] == "vdi"
    run = Path(result["run_dir"])
    # The same record an export run leaves: every stage's executed notebook, state, audit chain.
    assert json.loads((run / "state.json").read_text())["state"] == "completed"
    stages = config.pipeline_stages("export")
    assert sorted(p.stem for p in (run / "notebooks").glob("*.ipynb")) == stages
    assert (run / "audit.json").is_file() and Path(result["path"]).is_file()
    print(f"explore.ipynb ran in {seconds:.1f} s")

    # The page an auditor gets for this run, as Chromium renders it: the boot verdict (the Xen
    # sample prints its marker only when its own checks passed), the chain intact, the partition table.
    Cli(run.parent)("report", run.name)
    text = seen(run / "report.html", tmp_path, 2200)
    # OCR reads the code font's M as N now and then ("IMAGING-SANPLE-OK").
    assert re.search(r"booted: marker IMAGING-SA[MN]PLE-OK", text), text
    assert re.search(r"audit chain [\W_]*intact", text) and "boot start end sectors" in text, text


def test_panels_follow_their_controls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGING_RUNS", str(tmp_path / "runs"))
    ex = panels.Explorer.open("sample:xen", name="panels", target="virtualbox", image_format="vdi")
    tree = panels.TreePanel(ex, "/")
    tree.choose("/etc")  # a directory: listed
    assert tree.path.value == "/etc" and any("inittab" in label for label, _ in tree.entries.options)
    tree.choose("/etc/inittab")  # a file: shown
    assert "xvc0" in tree.content.value
    tree.choose("/etc/sysconfig/selinux")  # a symlink: shown at its target inside the guest
    assert "/etc/selinux/config" in tree.content.value and "SELINUX=enforcing" in tree.content.value

    profile = panels.ProfilePanel(ex)
    assert "centos5" in profile.found.value and profile.proposal.value == ""  # detected: no proposal
    assert 'name: "centos-5"' in profile.propose() and "review" in profile.proposal.value

    cleaning = panels.CleanPanel(ex)
    before = cleaning.plan.value
    assert cleaning.boxes["logfiles"].value and "/var/log/messages" in before
    cleaning.boxes["logfiles"].value = False  # what a click does: the observer plans again
    assert "/var/log/messages" not in cleaning.plan.value and ex.session.request.clean == ["-logfiles"]

    migration = panels.MigratePanel(ex)
    assert "ata_piix" in migration.plan.value
    migration.target.value = "kvm"
    assert "virtio_blk" in migration.plan.value and ex.session.request.target == "kvm"

    stages = panels.StagesPanel(ex)
    assert stages.run_next() and ex.session.runner.done("10-clean")
    assert cleaning.boxes["logfiles"].disabled and "10-clean has run" in cleaning.plan.value
    assert not cleaning.choose(["logfiles"]) and "already used" in cleaning.message.value

    # A user's leftovers: a removal and an allowance, each a click, each followed by a new scan.
    with access.editing(ex.session.ws) as g:
        g.makedirs("/srv/app")
        g.write_text("/srv/app/.env", "DB_PASSWORD=Vq8rPlanted4\n")
        g.write_text("/srv/app/settings.py", 'SECRET_KEY = "Zt5wKept9Lab"\n')
    found = panels.SecretsPanel(ex)
    labels = [row.children[2].value for row in found.rows.children]
    assert len(labels) == 2 and any("/srv/app/.env:1" in label for label in labels)
    assert not any("Vq8rPlanted4" in label for label in labels)
    assert found.remove("/srv/app/.env") and len(found.rows.children) == 1
    with ex.session.guest() as g:
        assert not g.exists("/srv/app/.env") and g.exists("/srv/app/settings.py")
    fingerprint = found.rows.children[0].children[1].tooltip
    assert found.allow(fingerprint) and ex.session.request.secrets_allow == [fingerprint]
    assert found.rows.children[0].children[1].description == "Allowed"
    assert isinstance(ex.session, steps.Session)
