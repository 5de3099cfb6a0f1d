"""The audit report as a person sees it: rendered by headless Chromium, read back by OCR.

One exported run (module-scoped) is reported on; each screenshot is read with tesseract and must
show what an auditor looks for first: the boot verdict, the partition table, the audit chain's
verdict. A copy of the run with one notebook changed must show the chain as broken, so the check
can fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cli, last_json


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [t for t in ("chromium", "tesseract") if shutil.which(t) is None]
    assert not missing, f"the report tests need {', '.join(missing)}: run 'make setup'"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, dict[str, Any]]:
    cli = Cli(tmp_path_factory.mktemp("report-runs"))
    return cli, last_json(
        cli("export", "sample:kvm", "--name", "audited", "--format", "qcow2", "--target", "kvm")
    )


def seen(page: Path, tmp: Path, height: int) -> str:
    """The words on the first ``height`` pixels of ``page`` at 1280 pixels wide, as OCR reads them."""
    png = tmp / f"{page.parent.name}-{page.stem}.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp / 'chromium'}", f"--window-size=1280,{height}", f"--screenshot={png}",
         page.as_uri()],
        check=True, capture_output=True, timeout=60, cwd=tmp,
    )  # fmt: skip
    return ocr(png)


def ocr(png: Path, *options: str) -> str:
    read = subprocess.run(
        ["tesseract", str(png), "-", *options], check=True, capture_output=True, text=True, timeout=60
    )
    return " ".join(read.stdout.split())


def test_the_report_shows_the_boot_verdict_and_the_partition_table(
    exported: tuple[Cli, dict[str, Any]], tmp_path: Path
) -> None:
    cli, result = exported
    run = cli.runs / result["run"]
    written = last_json(cli("report", result["run"]))
    assert written["reports"] == [str(run / "report.html")]
    layout = json.loads((run / "results" / "30-bootable.json").read_text())["layout"]

    text = seen(run / "report.html", tmp_path, 2200)
    assert "Audit record of run" in text
    # OCR reads the code font's M as N now and then ("IMAGING-SANPLE-OK").
    assert re.search(r"booted: marker IMAGING-SA[MN]PLE-OK", text), text
    # The verdict's badge comes out of OCR as punctuation or underscores ("audit chain __ intact").
    assert re.search(r"audit chain [\W_]*intact: \d+ files chained", text), text
    # A hybrid disk, the default: GPT, the root partition 1 (OCR loses the narrow first column).
    assert "start end sectors size type" in text, text
    row = f"{layout['start_sector']} {layout['end_sector']} {layout['partition_sectors']}"
    assert row in text, text
    assert "Booted: marker IMAGING-SAMPLE-OK on the serial console" in text, text
    assert "data:image/png;base64," in (run / "report.html").read_text()  # the VM's screen, inline

    index = seen(Path(written["index"]), tmp_path, 600)
    # Hashes and paths wrap in their narrow columns and OCR mixes up 0/O and 1/l: the words only.
    assert "audited" in index and "completed" in index and "booted" in index, index


def test_the_screen_at_the_end_of_the_boot_is_kept_and_shown(exported: tuple[Cli, dict[str, Any]]) -> None:
    cli, result = exported
    run = cli.runs / result["run"]
    screen = run / "verify" / "screen.png"
    assert json.loads((run / "results" / "50-verify.json").read_text())["screen"] == str(screen)
    # What QEMU's screen showed last: the guest kernel's messages on tty0, each with its timestamp
    # (which lines depends on when the guest powered off). A console is one block of lines: read
    # as one (page segmentation mode 6), or tesseract splits the timestamps off into columns.
    text = ocr(screen, "--psm", "6")
    assert len(re.findall(r"\d\.\d{6}\]", text)) >= 5, text


def test_a_changed_record_shows_as_broken(exported: tuple[Cli, dict[str, Any]], tmp_path: Path) -> None:
    cli, result = exported
    copy = Cli(tmp_path / "runs")
    shutil.copytree(cli.runs / result["run"], copy.runs / result["run"])
    notebook = copy.runs / result["run"] / "notebooks" / "40-export.ipynb"
    notebook.write_text(notebook.read_text() + " ")
    copy("report", result["run"])
    text = seen(copy.runs / result["run"] / "report.html", tmp_path, 1000)
    assert "BROKEN" in text and "intact" not in text, text
    assert "40-export.ipynb changed since it was recorded" in text, text
