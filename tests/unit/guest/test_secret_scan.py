"""The secret scan on a guest tree made here: what it finds, what it does not read, and that
nothing of a value leaves it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from imaging.disk.files import CONFIG_LIMIT, MAX_DEPTH, Guest
from imaging.errors import ParameterError
from imaging.guest import secret_rules, secret_scan, secrets
from imaging.guest.secret_scan import Fingerprints, Scanned
from imaging.run.request import Request

PRINTS = Fingerprints(b"test key")


def _tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for path, content in files.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def _scan(root: Path) -> Scanned:
    with Guest(root) as g:
        return secret_scan.scan(g, PRINTS)


def _found(out: Scanned) -> set[tuple[str, str]]:
    return {(f.path, f.detector) for f in out.findings}


def _key(tmp_path: Path, passphrase: str) -> bytes:
    key = tmp_path / f"k{len(passphrase)}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(key)], check=True)
    return key.read_bytes()


def test_a_key_without_a_passphrase_says_so(tmp_path: Path) -> None:
    open_key, locked = _key(tmp_path, ""), _key(tmp_path, "correct horse")
    assert [h.detector for h in secret_rules.private_keys(open_key)] == ["private key without passphrase"]
    assert [h.detector for h in secret_rules.private_keys(locked)] == ["private key"]
    assert (
        list(secret_rules.private_keys(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
        == []
    )


def test_findings_by_detector_rule_and_path(tmp_path: Path) -> None:
    root = _tree(tmp_path / "g", {
        "/home/u/.pgpass": "db:5432:app:app:Zq8vLr2mWx\n",
        "/home/u/.netrc": "machine h login u password Tr0ub4dor3x\n",
        "/srv/.env": "DATABASE_PASSWORD=Kx9fQ2wLmZ\n",
        "/etc/app.conf": "# password = example\nname = app\n",  # a commented-out example
        "/etc/nsswitch.conf": "passwd: files systemd\n",  # a setting, not a secret
        "/var/www/wp-config.php": "define( 'DB_PASSWORD', 'put your unique phrase here' );\n",
        "/opt/deploy_key": _key(tmp_path, ""),
        "/usr/share/doc/x/.env": "PASSWORD=NotInScope1\n",  # /usr is the distribution's
    })  # fmt: skip
    assert _found(_scan(root)) == {
        ("/home/u/.pgpass", "pgpass password"),
        ("/home/u/.netrc", "netrc password"),
        ("/srv/.env", "Secret Keyword"),
        ("/opt/deploy_key", "private key without passphrase"),
    }


def test_package_files_as_installed_are_not_scanned_and_changed_ones_are(tmp_path: Path) -> None:
    stock = "secret = pass:insta\n"
    root = _tree(tmp_path / "g", {
        "/etc/ssl/openssl.cnf": stock,
        "/etc/app/app.conf": "password = Wq3rTy7uIo\n",
        "/var/lib/dpkg/info/openssl.md5sums": f"{hashlib.md5(stock.encode()).hexdigest()}  etc/ssl/openssl.cnf\n",
        "/var/lib/dpkg/status": f"Package: app\nConffiles:\n /etc/app/app.conf {hashlib.md5(b'x').hexdigest()}\n",
    })  # fmt: skip
    out = _scan(root)
    assert _found(out) == {("/etc/app/app.conf", "Secret Keyword")}
    assert out.package_database == "dpkg"
    assert out.counts["its package's own content (digest as installed)"] == 1


def test_links_never_lead_out_of_the_guest(tmp_path: Path) -> None:
    outside = _tree(tmp_path / "host", {"/creds": "password = HostSecret9\n"})
    root = _tree(tmp_path / "g", {"/etc/hostname": "g\n"})
    (root / "etc/creds").symlink_to(outside / "creds")
    (root / "home").symlink_to(outside)
    assert _scan(root).findings == []


def test_bad_input_is_bounded_and_said(tmp_path: Path) -> None:
    root = _tree(tmp_path / "g", {
        "/opt/blob": b"\0ELF" + os.urandom(4096) + b"password = InBinary12",
        "/opt/minified.js": "var a='" + "x" * 3_000_000 + "';var password=\"Mq7zPp2Lk9\";\n",
        "/opt/latin1.conf": "nom = caf\xe9\npassword = Latin1Pw77\n".encode("latin-1"),
    })  # fmt: skip
    (root / "opt/huge.log").write_bytes(b"GET / 200\n" * (CONFIG_LIMIT // 10 + 1))
    deep = root / "srv"
    for _ in range(MAX_DEPTH + 2):
        deep = deep / "d"
    deep.mkdir(parents=True)
    out = _scan(root)
    assert _found(out) == {("/opt/minified.js", "Secret Keyword"), ("/opt/latin1.conf", "Secret Keyword")}
    assert out.counts["binary (a NUL byte in its first 8 KiB)"] == 1
    assert any(s.startswith("/opt/huge.log: only its first 8 MiB") for s in out.skipped)
    assert any("directories deep: not scanned" in s for s in out.skipped)


def test_fingerprints_are_keyed_stable_and_hold_no_value(tmp_path: Path) -> None:
    root = _tree(tmp_path / "g", {"/srv/.env": "API_KEY=Pl4nt3dValue77\n"})
    one, two = _scan(root), _scan(root)
    assert one.findings == two.findings and len(one.findings) == 1
    other = Fingerprints(b"another site")
    assert other.of("/srv/.env", "Secret Keyword", "Pl4nt3dValue77") != one.findings[0].fingerprint
    found = secrets.Scan("fail", one.findings, [], secret_scan.describe(one))
    line = secrets.one_line(found)
    assert "/srv/.env:1 Secret Keyword" in line and "Pl4nt3dValue77" not in line
    assert "Pl4nt3dValue77" not in repr(found.to_dict()) + found.table().to_string()
    with pytest.raises(secrets.SecretsFound):
        secrets.apply(None, found)  # type: ignore[arg-type]
    allowed = secrets.Scan("fail", one.findings, [one.findings[0].fingerprint], {})
    assert allowed.open == [] and secrets.apply(None, allowed)["allowed"] == [one.findings[0].fingerprint]  # type: ignore[arg-type]


def test_policy_by_visibility_and_allow_list_checked() -> None:
    assert secrets.policy("auto", "image", "public") == "fail"
    assert (
        secrets.policy("auto", "image", "selected") == secrets.policy("auto", "export", "private") == "warn"
    )
    assert secrets.policy("off", "image", "public") == "off"
    with pytest.raises(ParameterError, match="fingerprint"):
        Request.create(source="sample:kvm", name="x", secrets_allow=["not-hex"])
    with pytest.raises(ParameterError, match="secrets must be"):
        Request.create(source="sample:kvm", name="x", secrets="maybe")


RPMDB = Path(__file__).parents[2] / "data" / "rpm" / "rpmdb.sqlite"


def test_rpm_package_files_as_installed_are_not_scanned(tmp_path: Path) -> None:
    """A real rpm database (tests/data/rpm: rpm 4.18's SQLite backend): the packaged config file
    as installed is the package's; the one changed after is scanned."""
    root = _tree(tmp_path / "g", {
        "/etc/lab/lab.conf": "password = example-from-the-package\n",
        "/etc/lab/other.conf": 'token = "shipped"\npassword = Changed7Later\n',
        "/var/lib/rpm/rpmdb.sqlite": RPMDB.read_bytes(),
    })  # fmt: skip
    out = _scan(root)
    assert out.package_database == "rpm (sqlite)"
    assert _found(out) == {("/etc/lab/other.conf", "Secret Keyword")}
    # A database that is not one is read as none: every file is scanned, nothing fails.
    (root / "var/lib/rpm/rpmdb.sqlite").write_bytes(b"SQLite format 3\0" + os.urandom(5000))
    out = _scan(root)
    assert out.package_database.startswith("none") and len(out.findings) == 2


def test_a_recorded_diff_holds_no_secret(tmp_path: Path) -> None:
    """An edit of a line beside a credential (20-migrate's fstab): the diff shows the line with
    the value redacted; the file keeps it."""
    fstab = (
        "//nas/share /mnt/nas cifs username=lab,password=Nq4vSecretPw 0 0\n/dev/xvda1 / ext3 defaults 1 1\n"
    )
    root = _tree(tmp_path / "g", {"/etc/fstab": fstab})
    with Guest(root) as g:
        diff = g.edit(
            "/etc/fstab", lambda t: t.replace("/dev/xvda1", "UUID=1234").replace("/mnt/nas", "/srv/nas")
        )
    assert "Nq4vSecretPw" not in diff and "<secret: " in diff and "+UUID=1234 / ext3" in diff
    assert "password=Nq4vSecretPw" in (root / "etc/fstab").read_text()


def test_many_findings_are_counted_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secret_scan, "FINDINGS_KEPT", 100)
    many = tmp_path / "g" / "var/lib/app"
    many.mkdir(parents=True)
    for i in range(3000):  # a hostile tree of small files: 300 with a finding
        (many / f"f{i}.env").write_text(f"PASSWORD=Gx7q{i:05d}kW\n" if i % 10 == 0 else "x=1\n")
    out = _scan(tmp_path / "g")
    assert (len(out.findings), out.findings_not_kept, out.files_read) == (100, 200, 3000)
    found = secrets.Scan("fail", out.findings, [], secret_scan.describe(out))
    with pytest.raises(secrets.SecretsFound, match="^300 secret"):
        secrets.apply(None, found)  # type: ignore[arg-type]
