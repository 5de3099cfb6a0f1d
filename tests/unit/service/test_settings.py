"""Service settings: YAML, then environment variables, validated; secrets stay secret."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from imaging.errors import ParameterError
from imaging.service import settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = settings.load(None, {"IMAGING_STATE": str(tmp_path)})
    assert s.state_dir == tmp_path and s.host == "127.0.0.1" and s.port == 8080
    # No database_url: the private cluster in the state directory, by its socket.
    assert (
        s.private_database
        and s.sqlalchemy_url == f"postgresql+psycopg://imaging@/postgres?host={tmp_path / 'postgres'}"
    )
    assert s.public_url == "http://127.0.0.1:8080"
    assert (s.worker.concurrency, s.worker.embedded, s.smtp.host, s.publishing()) == (1, True, "", False)


def test_file_then_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 9000\nsmtp: {host: mail.example.org, port: 2525}\n"
                           "instances: {i-1: sample:kvm, i-2: /srv/images/i-2.img}\n")  # fmt: skip
    env = {
        "IMAGING_STATE": str(tmp_path),
        "IMAGING_SMTP__PORT": "587",
        "IMAGING_WORKER__CONCURRENCY": "3",
        "IMAGING_DATABASE_URL": "postgresql+psycopg://u:pw@127.0.0.1/db",
        "IMAGING_RUNS": "/elsewhere",
    }
    s = settings.load(path, env)
    assert (s.port, s.smtp.host, s.smtp.port, s.worker.concurrency) == (9000, "mail.example.org", 587, 3)
    assert s.instances == {"i-1": "sample:kvm", "i-2": "/srv/images/i-2.img"}
    assert s.sqlalchemy_url.startswith("postgresql+psycopg://")
    # The service's own file is found in the state directory without --config.
    assert settings.load(None, {"IMAGING_STATE": str(tmp_path)}).port == 9000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: blue\n", "colour: Extra inputs are not permitted"),
        ("smtp: {hots: x}\n", "smtp.hots: Extra inputs are not permitted"),
        ("port: 70000\n", "port: Input should be less than or equal to 65535"),
        ("worker: {concurrency: 0}\n", "worker.concurrency: Input should be greater than or equal to 1"),
        ("instances: {'i 1': sample:kvm}\n", "instance id 'i 1' has characters"),
        (
            "instances: {i-1: images/relative.img}\n",
            "must be an absolute path, sample:<name> or KIND://CLOUD/INSTANCE",
        ),
        ("[1, 2]\n", "expected a mapping"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ParameterError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        settings.load(write(tmp_path, text), {"IMAGING_STATE": str(tmp_path)})
    assert "\n" not in str(e.value)


def test_bad_environment_value(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="worker.stalled_seconds"):
        settings.load(None, {"IMAGING_STATE": str(tmp_path), "IMAGING_WORKER__STALLED_SECONDS": "soon"})
    with pytest.raises(
        ParameterError, match=r"stalled_seconds \(3\) must be at least twice heartbeat_seconds"
    ):
        settings.load(None, {"IMAGING_STATE": str(tmp_path), "IMAGING_WORKER__STALLED_SECONDS": "3"})


def test_secrets_do_not_print(tmp_path: Path) -> None:
    path = write(tmp_path, "smtp: {password: hunter2}\npublish: {bucket: b, secret_access_key: s3cr3t}\n")
    s = settings.load(path, {"IMAGING_STATE": str(tmp_path), "IMAGING_SECRET_KEY": "signing-key"})
    text = repr(s) + str(s) + s.model_dump_json()
    assert "hunter2" not in text and "s3cr3t" not in text and "signing-key" not in text
    assert s.smtp.password.get_secret_value() == "hunter2" and s.signing_key() == "signing-key"
    assert {"IMAGING_SMTP__PASSWORD", "IMAGING_PUBLISH__SECRET_ACCESS_KEY", "IMAGING_SECRET_KEY",
            "IMAGING_DATABASE_URL", "IMAGING_RECORDS", "IMAGING_RECORDS__SECRET_ACCESS_KEY"} <= settings.secret_env_names()  # fmt: skip


def test_the_record_store_keys_reach_a_run_and_print_as_stars(tmp_path: Path) -> None:
    path = write(
        tmp_path, "records: {bucket: runs, endpoint_url: 'http://127.0.0.1:9', secret_access_key: s3cr3t}\n"
    )
    s = settings.load(path, {"IMAGING_STATE": str(tmp_path), "IMAGING_RECORDS__KEEP_INPUTS": "true"})
    assert s.records.keep_inputs and "s3cr3t" not in repr(s) + s.model_dump_json()
    assert '"secret_access_key": "s3cr3t"' in s.records.env()  # a run's environment: the key itself
    with pytest.raises(ParameterError, match="records.colour: Extra inputs are not permitted"):
        settings.load(write(tmp_path, "records: {colour: red}\n"), {"IMAGING_STATE": str(tmp_path)})


def test_hosts_that_share_a_database_need_the_signing_key_set(tmp_path: Path) -> None:
    s = settings.load(
        None, {"IMAGING_STATE": str(tmp_path), "IMAGING_DATABASE_URL": "postgresql+psycopg://h/db"}
    )
    with pytest.raises(ParameterError, match="secret_key is not set: hosts that share a database"):
        s.signing_key()
    assert not (tmp_path / "secret.key").exists()


def test_the_signing_key_is_made_once_and_private(tmp_path: Path) -> None:
    s = settings.load(None, {"IMAGING_STATE": str(tmp_path / "state")})
    key = s.signing_key()
    assert len(key) > 40 and s.signing_key() == key
    assert stat.S_IMODE((tmp_path / "state" / "secret.key").stat().st_mode) == 0o600


def test_a_trailing_newline_is_no_part_of_an_address_or_an_instance_id(tmp_path: Path) -> None:
    # A mail header would end at the newline; "x@y\nBcc: z" must never reach one.
    for address in ("root@example.org\n", "root@example.org\nBcc: x@y"):
        with pytest.raises(ParameterError, match="is not an e-mail address"):
            settings.check_email(address)
    with pytest.raises(ParameterError, match="has characters other than"):
        settings.load(
            write(tmp_path, 'instances: {"i-1\\n": sample:kvm}\n'), {"IMAGING_STATE": str(tmp_path)}
        )
