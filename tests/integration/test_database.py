"""The service's database: schema migrations (a store made before migrations is adopted and
upgraded with its requests; commands refuse a schema they do not know, in one line naming the
command that upgrades it), the private cluster of a one-machine service (Unix socket only,
started and stopped by the commands that need it), and one signing key for hosts that share a
database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic import command
from sqlalchemy import create_engine, text

from imaging.service import schema

from ..conftest import Databases


def imaging(*args: str, env: dict[str, str], config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "imaging", *args, *(["--config", str(config)] if config else [])]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)


def settings_file(tmp_path: Path, **values: Any) -> tuple[Path, dict[str, str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(values))
    return path, {
        **os.environ,
        "IMAGING_STATE": str(tmp_path / "state"),
        "IMAGING_RUNS": str(tmp_path / "runs"),
    }


def test_a_store_made_before_migrations_is_upgraded_with_its_requests(
    tmp_path: Path, databases: Databases
) -> None:
    url = databases.new(schema=False)
    engine = create_engine(url)
    cfg = schema._config()
    with engine.begin() as conn:  # the first service's tables, as its create_all made them
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text("INSERT INTO users (name, role, token_hash, created) VALUES ('alice', 'user', 'h', now())")
        )
        conn.execute(text(
            "INSERT INTO image_requests (id, owner_id, instance, name, kind, shared_with, disk_format, target, options, "
            "state, version, created, updated, lease_until) VALUES ('ir-0123456789ab', 1, 'i-1', 'old one', 'export', "
            "'[]', 'qcow2', 'kvm', '{}', 'error', 3, now(), now(), now())"))  # fmt: skip
    conf, env = settings_file(tmp_path, database_url=url, secret_key="k" * 40)
    refused = imaging("worker", env=env, config=conf)
    (line,) = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and line.endswith(
        "was made before schema migrations: upgrade it with: python -m imaging db upgrade"
    ), refused.stderr
    upgraded = imaging("db", "upgrade", env=env, config=conf)
    assert upgraded.returncode == 0 and "database schema 0001 -> 0003" in upgraded.stderr, upgraded.stderr
    assert imaging("db", "status", env=env, config=conf).returncode == 0
    with engine.connect() as conn:
        row = conn.execute(text("SELECT name, state, job_id FROM image_requests")).one()
        assert tuple(row) == ("old one", "error", None)  # kept, and approving it will queue its job
        assert conn.execute(text("SELECT count(*) FROM procrastinate_jobs")).scalar() == 0
    assert "alice\tuser" in imaging("users", "list", env=env, config=conf).stdout

    # A schema one revision behind, and one this imaging does not know.
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    behind = imaging("serve", env=env, config=conf)
    assert behind.returncode == 1 and behind.stderr.strip().splitlines()[-1].endswith(
        "has schema revision 0001, this imaging needs 0003: upgrade it with: python -m imaging db upgrade"
    ), behind.stderr
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    ahead = imaging("worker", env=env, config=conf)
    assert ahead.returncode == 1 and ahead.stderr.strip().splitlines()[-1].endswith(
        "has schema revision 0099, which this imaging does not know (it knows up to 0003): upgrade imaging on this host"
    ), ahead.stderr
    # An empty database: created by the same command, not by a worker.
    empty = databases.new(schema=False)
    conf2, env2 = settings_file(tmp_path / "empty", database_url=empty, secret_key="k" * 40)
    assert "has no imaging schema yet: create it with: python -m imaging db upgrade" in imaging(
        "worker", env=env2, config=conf2).stderr  # fmt: skip
    engine.dispose()


def test_hosts_sharing_a_database_share_one_signing_key(tmp_path: Path, database: str) -> None:
    conf, env = settings_file(tmp_path, database_url=database)
    for cmd in ("worker", "serve"):
        proc = imaging(cmd, env=env, config=conf)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            "imaging: error: secret_key is not set: hosts that share a database must sign approve links with the "
            "same key (set secret_key, or IMAGING_SECRET_KEY, to the same long random string on each)"
        ], proc.stderr


def test_the_private_cluster_is_started_for_a_command_and_stopped_after(tmp_path: Path) -> None:
    conf, env = settings_file(tmp_path)
    token = imaging("users", "add", "root", "--admin", env=env, config=conf)
    assert token.returncode == 0 and token.stdout.startswith("imaging_"), token.stderr
    cluster = tmp_path / "state" / "postgres"
    assert (cluster / "data" / "PG_VERSION").is_file() and (cluster.stat().st_mode & 0o777) == 0o700
    assert not (cluster / "data" / "postmaster.pid").exists()  # stopped again
    conf_text = (cluster / "data" / "imaging.conf").read_text()
    assert "listen_addresses = ''" in conf_text  # a Unix socket only: no TCP at all
    listed = imaging("users", "list", env=env, config=conf)
    assert listed.stdout.splitlines() == ["root\tadmin\t-"]
    assert not (cluster / "data" / "postmaster.pid").exists()


@pytest.mark.parametrize("bad", ["sqlite:///x.db"])
def test_only_postgresql(tmp_path: Path, bad: str) -> None:
    conf, env = settings_file(tmp_path, database_url=bad, secret_key="k" * 40)
    proc = imaging("db", "status", env=env, config=conf)
    assert proc.returncode != 0 and "PostgreSQL" in proc.stderr
