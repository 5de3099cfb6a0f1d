"""A mail the SMTP server does not take now is sent again later, once; one it never takes is
given up, and the log says so. A real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from imaging.service import settings
from imaging.service.notify import Mailer
from tests.integration.servicekit import SMTP_PASSWORD, SMTP_USER, smtp_server, wait_for


def mailer(tmp_path: Path, port: int, **smtp: float) -> Mailer:
    mail = settings.SMTP(host="127.0.0.1", port=port, username=SMTP_USER, password=SMTP_PASSWORD, **smtp)  # type: ignore[arg-type]
    conf = settings.Settings(state_dir=tmp_path, smtp=mail)
    return Mailer(conf, store=None)  # type: ignore[arg-type] # send() needs no store


def test_a_refused_mail_is_sent_once_the_server_takes_mail(tmp_path: Path) -> None:
    with smtp_server() as (box, port):
        box.refusing = True
        m = mailer(tmp_path, port, retry_seconds=0.2)
        assert not m.send("root@example.org", "[imaging] one", "body")
        assert not m.send("root@example.org", "[imaging] two", "body")
        wait_for("a second refusal", lambda: box.refused >= 3, 10, 0.05)  # tried again meanwhile
        assert box.messages == []
        box.refusing = False
        wait_for("both mails", lambda: len(box.messages) == 2, 10, 0.05)
        time.sleep(1)  # and no third
        assert [str(m["Subject"]) for m in box.messages] == ["[imaging] one", "[imaging] two"]


def test_a_mail_never_taken_is_given_up_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "imaging.service.notify")
    with smtp_server() as (box, port):
        box.refusing = True
        m = mailer(tmp_path, port, retry_seconds=0.1, retry_for_seconds=0.5)
        assert not m.send("root@example.org", "[imaging] lost", "body")
        wait_for("the mail given up", lambda: "given up" in caplog.text, 10, 0.05)
        box.refusing = False
        time.sleep(0.5)
        assert box.messages == []
    assert "mail '[imaging] lost' to root@example.org not sent: (451" in caplog.text


def test_no_retry_when_asked_for_none(tmp_path: Path) -> None:
    with smtp_server() as (box, port):
        box.refusing = True
        m = mailer(tmp_path, port, retry_seconds=0.1, retry_for_seconds=0)
        assert not m.send("root@example.org", "[imaging] once", "body")
        time.sleep(0.5)
        assert box.refused == 1
