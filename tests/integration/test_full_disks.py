"""The full-disks campaign's short form (tests/campaigns/full_disks.py): the runs directory and
``--out`` on small filesystems, refused up front, then run out of space in the first stage, in
40-export and in the boot check; each a one-line error naming the directory and the space
needed, the user's files untouched, and the run resumed to a verified artifact (one boot)."""

from __future__ import annotations

from pathlib import Path

from tests.campaigns import full_disks

CASES = [("00-acquire", "runs"), ("40-export", "out"), ("50-verify", "runs")]


def test_full_disks_fail_in_one_line_and_resume(kvm_sample: Path) -> None:
    cases = list(full_disks.campaign("qcow2", CASES))
    for case in cases:
        print(case)
    assert [(c.stage, c.where) for c in cases] == [("preflight", "runs"), ("preflight", "out"), *CASES,
                                                   ("resume", "all")]  # fmt: skip
    failed = [str(c) for c in cases if not c.ok]
    assert not failed, "\n".join(failed)
