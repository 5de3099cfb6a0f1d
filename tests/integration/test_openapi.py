"""Property-based tests of the running service against its own OpenAPI description (schemathesis):
no 5xx, and no response that contradicts the description (status codes, content types, bodies,
headers), for an admin and for a plain user. The service runs without a worker, so approving the
requests the fuzzer makes starts nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .servicekit import Service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("openapi")
    config = {
        "instances": {"i-sample": "sample:kvm", "i-other": "/srv/i-other.img"},
        "publish": {"bucket": "images"},
        "worker": {"embedded": False},
    }
    svc = Service(root, root / "runs", config)
    svc.add_user("alice")
    svc.add_user("bob")
    svc.add_user("root", admin=True)
    svc.start()
    yield svc
    svc.stop()
    log = svc.log.read_text()
    assert not re.search(r"Traceback|Exception in ASGI", log), log[-3000:]


@pytest.mark.parametrize(("user", "examples"), [("root", 50), ("alice", 15)])
def test_schemathesis_finds_nothing(service: Service, user: str, examples: int) -> None:
    proc = subprocess.run(
        [Path(sys.executable).parent / "schemathesis", "run", f"{service.url}/openapi.json",
         "-H", f"Authorization: Bearer {service.tokens[user]}",
         # Every check but "positive data acceptance": valid-looking names of instances or users
         # the service does not know are rightly refused (422).
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", str(examples), "--workers", "1", "--request-timeout", "30"],
        capture_output=True, text=True, timeout=600, env=service.env, cwd=service.root,  # its cache goes there
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", proc.stdout), proc.stdout[-2000:]
    assert not re.search(r" 5\d\d \d+ ms$", service.log.read_text(), re.M)  # the access log: no 5xx
