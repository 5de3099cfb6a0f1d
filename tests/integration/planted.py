"""Secrets as users leave them in a real guest: each kind in the place it is usually left, in the
format the tool that writes it uses (keys made by ssh-keygen and openssl, token stores made with
SQLite), with values made fresh for each test run. The tests then look for every value in
everything the run wrote."""

from __future__ import annotations

import base64
import json
import random
import secrets
import sqlite3
import string
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_ALNUM = string.ascii_letters + string.digits


def _rand(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(random.SystemRandom().choice(alphabet) for _ in range(n))


@dataclass(frozen=True)
class Planted:
    path: str  # in the guest
    content: bytes
    values: tuple[str, ...]  # what must appear in no record (the secret parts of content)
    kind: str  # what a reader calls it


def _ssh_key(passphrase: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        key = Path(d) / "k"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "deploy@ci", "-f", str(key)],
                       check=True)  # fmt: skip
        return key.read_bytes()


def _openssl_key() -> bytes:
    return subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                          check=True, capture_output=True).stdout  # fmt: skip


def _sqlite(rows: list[tuple[str, str]]) -> bytes:
    """gcloud's credentials.db: a SQLite table of account id and credential JSON."""
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(Path(d) / "c.db")
        db.execute("CREATE TABLE credentials (account_id TEXT PRIMARY KEY, value BLOB)")
        db.executemany("INSERT INTO credentials VALUES (?, ?)", rows)
        db.commit()
        db.close()
        return (Path(d) / "c.db").read_bytes()


def _body(pem: bytes) -> str:
    """A PEM key's base64 lines, joined: what a leak of it would show."""
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))[:64]


def kinds() -> list[Planted]:
    home = "/home/debian"
    aws_id, aws_secret = "AKIA" + _rand(16, string.ascii_uppercase + string.digits), _rand(40)
    gh, gl = "ghp_" + _rand(36), "glpat-" + _rand(20)
    slack = f"xoxb-{random.randint(10**10, 10**11)}-{random.randint(10**10, 10**11)}-{_rand(24).lower()}"
    stripe = "sk_live_" + _rand(24)
    openai = "sk-" + _rand(20) + "T3BlbkFJ" + _rand(20)
    npm = "npm_" + _rand(36)
    pypi = "pypi-AgEIcHlwaS5vcmc" + _rand(80)
    azure = base64.b64encode(secrets.token_bytes(64)).decode()
    jwt_parts = [base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
                 for p in ({"alg": "HS256", "typ": "JWT"}, {"sub": _rand(12), "iat": 1700000000})]  # fmt: skip
    jwt = ".".join([*jwt_parts, _rand(43)])
    pg, netrc, gitpw, dbpw, wp, cron, unit, mycnf, kube, jup = (_rand(18) for _ in range(10))
    docker = base64.b64encode(f"deploy:{_rand(20)}".encode()).decode()
    vault, gsecret, grefresh, apt = "hvs." + _rand(24), _rand(24), "1//" + _rand(40), _rand(16)
    deploy, protected, tls = _ssh_key(""), _ssh_key(_rand(12)), _openssl_key()
    sa_key = _openssl_key().decode()
    adc = json.dumps({"client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
                      "client_secret": gsecret, "refresh_token": grefresh, "type": "authorized_user"}, indent=2)  # fmt: skip
    sa = json.dumps({"type": "service_account", "project_id": "lab-42", "private_key_id": _rand(40).lower(),
                     "private_key": sa_key, "client_email": "ci@lab-42.iam.gserviceaccount.com"}, indent=2)  # fmt: skip
    gdb_token = _rand(30)
    out = [
        Planted(f"{home}/.aws/credentials",
                f"[default]\naws_access_key_id = {aws_id}\naws_secret_access_key = {aws_secret}\n".encode(),
                (aws_id, aws_secret), "AWS CLI credentials"),
        Planted(f"{home}/.config/gcloud/application_default_credentials.json", adc.encode(), (gsecret, grefresh),
                "gcloud application default credentials"),
        Planted(f"{home}/.config/gcloud/credentials.db",
                _sqlite([("ci@lab-42.iam", json.dumps({"refresh_token": gdb_token}))]), (gdb_token,),
                "gcloud credential store (SQLite)"),
        Planted("/opt/app/service-account.json", sa.encode(), (_body(sa_key.encode()),),
                "GCP service account key"),
        Planted(f"{home}/.netrc", f"machine backup.example.org\n  login deploy\n  password {netrc}\n".encode(),
                (netrc,), ".netrc"),
        Planted(f"{home}/.pgpass", f"db.internal:5432:app:app:{pg}\n".encode(), (pg,), ".pgpass"),
        Planted(f"{home}/.git-credentials", f"https://deploy:{gitpw}@git.example.org\n".encode(), (gitpw,),
                ".git-credentials"),
        Planted("/opt/app/deploy_key", deploy, (_body(deploy),), "SSH private key without a passphrase"),
        Planted(f"{home}/keys/id_ed25519_protected", protected, (_body(protected),),
                "SSH private key with a passphrase"),
        Planted("/etc/ssl/private/app.example.org.key", tls, (_body(tls),), "TLS private key (openssl)"),
        Planted("/srv/app/.env",
                f"DEBUG=0\nDATABASE_PASSWORD={dbpw}\nSTRIPE_SECRET_KEY={stripe}\n".encode(), (dbpw, stripe),
                ".env with a database password and a Stripe key"),
        Planted("/srv/app/settings.py",
                f'DEBUG = False\nSLACK_BOT_TOKEN = "{slack}"\nOPENAI_API_KEY = "{openai}"\n'.encode(),
                (slack, openai), "Django settings with Slack and OpenAI tokens"),
        Planted(f"{home}/.kube/config",
                ("apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n"
                 f"    token: {kube}\n").encode(), (kube,), "kubeconfig"),  # fmt: skip
        Planted("/var/www/html/wp-config.php",
                (f"<?php\ndefine( 'DB_NAME', 'wordpress' );\ndefine( 'DB_USER', 'wp' );\n"
                 f"define( 'DB_PASSWORD', '{wp}' );\n").encode(), (wp,), "wp-config.php"),  # fmt: skip
        Planted(f"{home}/.local/share/jupyter/runtime/jpserver-4242.json",
                json.dumps({"port": 8888, "token": jup, "url": "http://localhost:8888/"}).encode(), (jup,),
                "Jupyter server runtime file"),
        Planted("/var/spool/cron/crontabs/debian",
                f"# m h dom mon dow command\n0 3 * * * PGPASSWORD={cron} pg_dump -h db app > /srv/dump.sql\n".encode(),
                (cron,), "crontab with a password"),
        Planted("/etc/systemd/system/app.service",
                (f"[Unit]\nDescription=app\n\n[Service]\nEnvironment=DB_PASSWORD={unit}\n"
                 "ExecStart=/opt/app/run\n\n[Install]\nWantedBy=multi-user.target\n").encode(), (unit,),
                "systemd unit Environment="),  # fmt: skip
        Planted(f"{home}/.docker/config.json", json.dumps({"auths": {"registry.example.org": {"auth": docker}}},
                indent="\t").encode(), (docker,), "Docker registry auth"),  # fmt: skip
        Planted(f"{home}/.config/gh/hosts.yml",
                f"github.com:\n    user: deploy\n    oauth_token: {gh}\n    git_protocol: https\n".encode(), (gh,),
                "GitHub CLI token"),
        Planted(f"{home}/.config/glab-cli/config.yml",
                f"hosts:\n    gitlab.com:\n        token: {gl}\n".encode(), (gl,), "GitLab token"),
        Planted(f"{home}/.npmrc", f"//registry.npmjs.org/:_authToken={npm}\n".encode(), (npm,), "npm token"),
        Planted(f"{home}/.pypirc", f"[pypi]\nusername = __token__\npassword = {pypi}\n".encode(), (pypi,),
                "PyPI token"),
        Planted("/opt/app/appsettings.json",
                json.dumps({"Storage": f"DefaultEndpointsProtocol=https;AccountName=labdata;AccountKey={azure};"
                            "EndpointSuffix=core.windows.net"}).encode(), (azure,), "Azure storage key"),  # fmt: skip
        Planted("/srv/api/session.txt", f"{jwt}\n".encode(), (jwt,), "JWT"),
        Planted(f"{home}/.vault-token", vault.encode(), (vault,), "Vault token"),
        Planted(f"{home}/.my.cnf", f"[client]\nuser=app\npassword={mycnf}\n".encode(), (mycnf,), "MySQL .my.cnf"),
        Planted("/etc/apt/auth.conf.d/private.conf", f"machine apt.example.org login ci password {apt}\n".encode(),
                (apt,), "apt auth.conf"),
        Planted("/usr/local/bin/backup.sh",
                (f"#!/bin/sh\nexport AWS_ACCESS_KEY_ID={aws_id}\n"
                 f"rsync -a /srv https://backup:{dbpw}@backup.example.org/lab/\n").encode(),  # fmt: skip
                (aws_id,), "script with a key and a URL password"),
    ]  # fmt: skip
    return out


def plant(root: Path, items: list[Planted], uid: int = 1000) -> None:
    """Write each file under a mounted guest root (directories made as needed, mode 0600)."""
    for item in items:
        path = root / item.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.content)
        path.chmod(0o600)
        if item.path.startswith("/home/"):
            import os

            os.chown(path, uid, uid)
