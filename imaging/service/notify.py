"""E-mails to the admins: a new request (with an approve link), and a finished or failed run.

Every admin user with an address gets their own mail, so their approve link is signed for them
and the approval is recorded as theirs. The link opens a confirmation page; only its button
approves (mail scanners follow links: a GET never changes anything). A mail that cannot be sent
does not stop the request (it can always be approved through the API): it is sent again every
``smtp.retry_seconds`` while the server is down or refusing, for up to ``smtp.retry_for_seconds``,
and each mail's fate is logged (sent, sent late, or given up). The mails waiting are held in the
process that made them: a process that stops first logs each of them as not sent.
"""

from __future__ import annotations

import atexit
import logging
import smtplib
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from imaging.service import approvals
from imaging.service.settings import Settings
from imaging.service.store import ImageRequest, Store, User

log = logging.getLogger("imaging.service.notify")


class _Permanent(Exception):
    """The server refused a mail for good (5xx): sending it again would not help."""


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Outbox:
    """Mails the server did not take yet, sent again in order on a thread of their own (the
    request that made them does not wait); a round stops at the first mail still refused, so
    a server that is away is asked once a round."""

    def __init__(self, deliver: Callable[[EmailMessage], Exception | None], every: float) -> None:
        self.deliver = deliver
        self.every = every
        self.lock = threading.Lock()
        self.held: list[tuple[EmailMessage, float]] = []
        self.thread: threading.Thread | None = None
        atexit.register(self.drop)

    def hold(self, msg: EmailMessage, until: float) -> None:
        with self.lock:
            self.held.append((msg, until))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._resend, name="mail outbox", daemon=True)
                self.thread.start()

    def _resend(self) -> None:
        while True:
            time.sleep(self.every)
            with self.lock:
                held = list(self.held)
            if not held:
                return
            for msg, until in held:
                error = self.deliver(msg)
                if error is None:
                    log.info("mail %r sent to %s (sent again)", msg["Subject"], msg["To"])
                elif isinstance(error, _Permanent) or time.monotonic() > until:
                    log.error("mail %r to %s given up: %s", msg["Subject"], msg["To"], _brief(error))
                else:
                    break
                with self.lock:
                    self.held.remove((msg, until))
            with self.lock:
                if not self.held:
                    return

    def drop(self) -> None:
        """At the process's end: the mails still waiting, logged as not sent."""
        with self.lock:
            held, self.held = self.held, []
        for msg, _ in held:
            log.error("mail %r to %s not sent: the process stopped before the server took it",
                      msg["Subject"], msg["To"])  # fmt: skip


class Mailer:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.outbox = Outbox(self._deliver, settings.smtp.retry_seconds)

    def admins(self) -> list[User]:
        return [u for u in self.store.users(role="admin") if u.email]

    def send(self, to: str, subject: str, body: str) -> bool:
        """Send a mail now; False if it was not (then it is sent again later if the server may
        take it later: see the module)."""
        smtp = self.settings.smtp
        if not smtp.host:
            return False
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = smtp.sender, to, subject
        msg.set_content(body)
        error = self._deliver(msg)
        if error is None:
            log.info("mail %r sent to %s", subject, to)
            return True
        if isinstance(error, _Permanent) or not smtp.retry_for_seconds:
            log.warning("mail %r to %s not sent: %s", subject, to, _brief(error))
            return False
        log.warning("mail %r to %s not sent: %s; trying again every %g s for up to %g s", subject, to,
                    _brief(error), smtp.retry_seconds, smtp.retry_for_seconds)  # fmt: skip
        self.outbox.hold(msg, time.monotonic() + smtp.retry_for_seconds)
        return False

    def _deliver(self, msg: EmailMessage) -> Exception | None:
        smtp = self.settings.smtp
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as server:
                if smtp.starttls:
                    server.starttls()
                if smtp.username:
                    server.login(smtp.username, smtp.password.get_secret_value())
                server.send_message(msg)
        except smtplib.SMTPResponseException as e:
            return _Permanent(_brief(e)) if e.smtp_code >= 500 else e
        except smtplib.SMTPRecipientsRefused as e:
            return _Permanent(_brief(e))
        except (OSError, smtplib.SMTPException) as e:
            return e
        return None

    def approve_link(self, req: ImageRequest, admin: User) -> str:
        token = approvals.sign_approval(self.settings.signing_key(), req.id, admin.id, req.version)
        return f"{self.settings.public_url}/api/v1/approve?token={token}"

    def request_created(self, req: ImageRequest) -> int:
        """Ask every admin to approve a new request; return how many mails went out."""
        what = (
            f"an export of {req.instance} as {req.disk_format}"
            if req.kind == "export"
            else f"an image of {req.instance}"
        )
        subject = f"[imaging] approve {req.id}: {what} ({req.name}) for {req.owner.name}"
        sent = 0
        for admin in self.admins():
            body = "\n".join([
                f"{req.owner.name} asks for {what}.", "", *describe(req), "",
                "Approve it (a confirmation page opens first; the link works once, and for "
                f"{self.settings.approval_ttl_seconds // 3600} hours):",
                f"  {self.approve_link(req, admin)}", "",
                "Or with the API:",
                f"  PATCH {self.request_url(req)}  {{\"status\": \"approve\"}}  (or deny)", "",
            ])  # fmt: skip
            sent += self.send(admin.email or "", subject, body)
        return sent

    def request_finished(self, req: ImageRequest) -> int:
        """Tell every admin how a run ended: sha256 and boot verdict, or the error, and where the
        audit record is. A failed request's mail carries a link that approves it again (resume)."""
        result: dict[str, Any] = req.result or {}
        boot = (result.get("boot") or {}).get("verdict") or "not booted"
        if req.state == "completed":
            subject = f"[imaging] {req.id} completed: {req.name} ({boot})"
        else:
            subject = f"[imaging] {req.id} failed at {req.stage or 'start'}: {req.name}"
        url = self.request_url(req)
        sent = 0
        for admin in self.admins():
            lines = [
                f"Request {req.id} of {req.owner.name} is {req.state}.", "", *describe(req),
                f"  sha256      {result.get('sha256') or '-'}",
                f"  boot check  {boot}",
                *[f"    why       {why}" for why in ((result.get("boot") or {}).get("reasons") or [])[:8]],
                f"  source      {result.get('source_digest') or '-'}",
                f"  audit head  {result.get('audit_head') or '-'}",
            ]  # fmt: skip
            if req.error:
                lines += [f"  error       {req.error}"]
            lines += ["", f"Audit record: {url}/audit", f"Notebooks:    {url}/notebooks"]
            if req.state == "completed":
                lines += [
                    f"Download:     {url}/artifact",
                    "",
                    "Check that the image works before you forward this mail to its owner.",
                ]
            else:
                lines += ["", f"Fix the cause, then approve again to resume at {req.stage or 'the start'}:",
                          f"  {self.approve_link(req, admin)}"]  # fmt: skip
            sent += self.send(admin.email or "", subject, "\n".join(lines) + "\n")
        return sent

    def request_url(self, req: ImageRequest) -> str:
        return f"{self.settings.public_url}/api/v1/request_image/{req.id}"


def describe(req: ImageRequest) -> list[str]:
    return [f"  {k:<11} {v}" for k, v in facts(req)]


def facts(req: ImageRequest) -> list[tuple[str, str]]:
    """What a request asks for and what its run will do, as the admin approves it (mail, web page)."""
    rows = [("request", req.id), ("name", req.name), ("owner", req.owner.name), ("instance", req.instance),
            ("kind", req.kind), ("format", req.disk_format), ("target", req.target)]  # fmt: skip
    if req.kind == "image":
        rows += [("visibility", req.vis or "-"), ("shared with", ", ".join(req.shared_with) or "-")]
    rows += options(req)
    rows += [("requested", req.created.isoformat(timespec="seconds"))]
    published = ((req.result or {}).get("published") or {}) if req.state == "completed" else {}
    if published.get("image_id"):
        rows += [
            (
                "image",
                f"{published['image_id']} in {published.get('destination')} ({published.get('location')})",
            )
        ]
    elif published.get("key"):
        rows += [("published", f"s3://{published.get('bucket')}/{published['key']}")]
    return rows


def options(req: ImageRequest) -> list[tuple[str, str]]:
    """What the run will do besides the defaults, as the admin approves it."""
    given = dict(req.options or {})
    rows = [("profile", given.get("profile") or "auto (detected from the guest)"),
            ("clean", ", ".join(given.get("clean") or []) or "the profile's defaults"),
            ("install", ", ".join(given.get("packages_install") or []) or "-"),
            ("remove", ", ".join(given.get("packages_remove") or []) or "-"),
            ("layout", given.get("layout") or "aligned (default)"),
            ("firmware", given.get("firmware") or "hybrid where the target and guest boot both (default)"),
            ("boot marker", given.get("boot_marker") or "a login prompt")]  # fmt: skip
    if req.kind == "image":
        rows += [("publish to", given.get("destination") or "s3")]
    rows += [("secrets", given.get("secrets") or "the site's policy (a public image stops on a finding)")]
    if given.get("secrets_allow"):
        rows += [("allowed", ", ".join(given["secrets_allow"]))]
    return rows
