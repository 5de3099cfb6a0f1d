from __future__ import annotations

from pathlib import Path

import pytest

from imaging.disk.files import Guest
from imaging.errors import ParameterError
from imaging.guest import clean, clean_ops
from imaging.guest.clean_ops import Action


def test_registry_is_well_formed() -> None:
    table = clean.operations_table()
    assert len(table) >= 15
    assert {"logfiles", "ssh-hostkeys", "machine-id", "net-hwaddr", "cloud-init", "platform-files"} <= set(
        table.column("operation")
    )
    for heading in table.column("heading"):
        assert heading and not heading.endswith(".")


def test_selection_words() -> None:
    defaults = clean.select(["defaults"])
    assert "package-cache" not in defaults and "user-account" not in defaults
    assert "ssh-hostkeys" not in clean.select(["defaults", "-ssh-hostkeys"])
    assert "package-cache" in clean.select(["defaults", "package-cache"])
    assert clean.select(["defaults", "none", "logfiles"]) == ["logfiles"]
    assert set(clean.select(["all"])) == set(clean_ops.REGISTRY)
    assert clean.select(["all"])[0] == "platform-files"  # ordered by (order, name)
    with pytest.raises(ParameterError, match="unknown clean operation 'bogus'"):
        clean.select(["defaults", "bogus"])


def test_bad_registrations_are_refused() -> None:
    with pytest.raises(ValueError):
        clean_ops.operation("logfiles", "Duplicate")(lambda ctx: [])
    with pytest.raises(ValueError):
        clean_ops.operation("Bad_Name", "Heading")(lambda ctx: [])
    with pytest.raises(ValueError):
        clean_ops.operation("fine-name", "Ends with a period.")(lambda ctx: [])


def test_a_directory_of_many_files_is_one_row_of_the_record() -> None:
    from imaging.guest.clean import FOLD, folded

    many = [Action("logfiles", f"/var/log/app/{i}.log", "truncate", 10) for i in range(FOLD + 1)]
    few = [
        Action("logfiles", "/var/log/messages", "truncate", 7),
        Action("tmp-files", "/tmp/x", "remove", 1),
    ]
    rows = folded([few[0], *many, few[1]])
    assert [r["path"] for r in rows] == ["/var/log/messages", f"/var/log/app/* ({FOLD + 1} files)", "/tmp/x"]
    assert rows[1]["count"] == FOLD + 1 and rows[1]["bytes"] == 10 * (FOLD + 1)
    assert len(folded(many[:FOLD])) == FOLD  # up to FOLD, each file by name


def test_networkmanagers_own_leases_go_and_its_state_stays(tmp_path: Path) -> None:
    nm = tmp_path / "var" / "lib" / "NetworkManager"
    nm.mkdir(parents=True)
    (nm / "internal-9f3c0d4e-1b2a-4c5d-8e6f-7a8b9c0d1e2f-eth0.lease").write_text("ADDRESS=10.31.7.19\n")
    (nm / "NetworkManager.state").write_text("[main]\nNetworkingEnabled=true\n")
    (nm / "secret_key").write_bytes(b"k" * 32)
    with Guest(tmp_path) as g:
        actions = clean_ops.dhcp_client_state(clean_ops.Context(g, None, [], []))  # type: ignore[arg-type]
    assert [a.path for a in actions] == [
        "/var/lib/NetworkManager/internal-9f3c0d4e-1b2a-4c5d-8e6f-7a8b9c0d1e2f-eth0.lease"
    ]
