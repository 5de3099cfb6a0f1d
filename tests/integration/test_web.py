"""The web page in a real browser (Debian's chromium and chromium-driver, through Selenium) against
the real service on loopback: alice signs in by the link mailed to her, makes a mistake in the
form and sees it next to the field, asks for an export of sample:kvm; root, in a second browser,
approves it from the list of pending requests, with what the run will do shown first; alice
watches the progress to completed, downloads the artifact and reads the report. The error
paths: a form from an ended session is refused (CSRF), another user's request is a 404. Every
page is saved as a screenshot under out/test_web/ (or $IMAGING_TEST_OUT/test_web/), and no token,
sign-in link or session cookie is in any log or record."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from imaging import config

from .servicekit import SMTP_PASSWORD, SMTP_USER, Mailbox, Service, assert_no_secrets, smtp_server

SCREENS = Path(os.environ.get("IMAGING_TEST_OUT", config.PROJECT / "out")) / "test_web"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Mailbox]]:
    root = tmp_path_factory.mktemp("web")
    with smtp_server() as (mailbox, smtp_port):
        conf = {
            "instances": {"i-sample": "sample:kvm"},
            "smtp": {
                "host": "127.0.0.1",
                "port": smtp_port,
                "username": SMTP_USER,
                "password": SMTP_PASSWORD,
            },
            "worker": {"concurrency": 1, "poll_seconds": 0.5},
        }
        service = Service(root, root / "runs", conf)
        service.add_user("alice", email="alice@example.org")
        service.add_user("bob", email="bob@example.org")
        service.add_user("root", admin=True, email="root@example.org")
        service.start()
        try:
            yield service, mailbox
        finally:
            service.stop()


class Browser:
    """One person's Chromium (its own profile: its own cookies), saving a screenshot per page."""

    def __init__(self, who: str, profile: Path, service: Service, mailbox: Mailbox) -> None:
        missing = [t for t in ("chromium", "chromedriver") if shutil.which(t) is None]
        assert not missing, f"the browser test needs {', '.join(missing)}: run 'make setup'"
        self.who, self.service, self.mailbox = who, service, mailbox
        self.downloads = profile / "downloads"
        self.downloads.mkdir(parents=True)
        opts = Options()
        opts.binary_location = shutil.which("chromium") or ""
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1000,800", f"--user-data-dir={profile / 'chromium'}"):  # fmt: skip
            opts.add_argument(arg)
        opts.add_experimental_option("prefs", {"download.default_directory": str(self.downloads),
                                               "download.prompt_for_download": False})  # fmt: skip
        self.driver: WebDriver = webdriver.Chrome(
            service=ChromeService(shutil.which("chromedriver")), options=opts
        )
        self.driver.set_page_load_timeout(60)
        self.shots = 0
        self.links: list[str] = []

    def get(self, path: str) -> None:
        self.driver.get(self.service.url + path)

    def shot(self, name: str) -> None:
        SCREENS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        # The whole page: the window as tall as the page (to a limit), then back.
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(1000, min(max(height + 140, 700), 2400))
        self.driver.save_screenshot(str(SCREENS / f"{self.who}-{self.shots:02d}-{name}.png"))
        self.driver.set_window_size(1000, 800)

    def text(self) -> str:
        # Read in one script: the live progress replaces its part of the page meanwhile.
        return str(self.driver.execute_script("return document.body.innerText"))

    def click(self, text: str, navigates: bool = True) -> None:
        """Click a button or link by its text; wait for the next page when it leads to one."""
        path = f"//button[normalize-space()='{text}'] | //a[normalize-space()='{text}']"
        for attempt in range(5):  # a page still settling (its DOM replaced under the driver): again
            try:
                page = self.driver.find_element(By.TAG_NAME, "html")
                self.driver.find_element(By.XPATH, path).click()
                break
            except WebDriverException:
                if attempt == 4:
                    raise
                time.sleep(0.5)
        if navigates:
            WebDriverWait(self.driver, 60).until(lambda _: _gone(page))

    def sign_in(self, email: str, count: int = 1) -> None:
        self.get("/web/")  # signed out: to the sign-in page
        assert self.driver.current_url.endswith("/web/signin") or count > 1
        self.get("/web/signin")
        self.shot("sign-in")
        self.driver.find_element(By.ID, "email").send_keys(email)
        self.click("Mail me a sign-in link")
        assert "sign-in link is on its way" in self.text()

        def mails() -> list[Any]:
            return [m for m in self.mailbox.messages if m["To"] == email and "sign-in" in str(m["Subject"])]

        found = _wait(f"the sign-in mail to {email}", lambda: len(mails()) >= count and mails())
        link = re.search(r"(http://\S+/web/signin/link\?token=\S+)", found[-1].get_content())
        assert link, found[-1].get_content()
        self.links.append(link.group(1))
        self.driver.get(link.group(1))
        self.shot("sign-in-link")
        self.click(f"Sign in as {self.who}")
        assert self.driver.current_url.endswith("/web/requests"), self.text()

    def cookie(self) -> str:
        return str(self.driver.get_cookie("imaging_session")["value"])  # type: ignore[index]

    def quit(self) -> None:
        self.driver.quit()


def _gone(element: WebElement) -> bool:
    """Whether a page's element is gone: stale, or (Chromium, mid-navigation) no longer in a document."""
    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException among them
        return True
    return False


def _wait(what: str, check: Any, timeout: float = 30, step: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)
    return value


def test_ask_approve_watch_download_report(world: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    service, mailbox = world
    if SCREENS.exists():
        shutil.rmtree(SCREENS)
    profiles = tmp_path_factory.mktemp("browsers")  # apart from the service's files: cookies live here
    alice = Browser("alice", profiles / "alice", service, mailbox)
    root = Browser("root", profiles / "root", service, mailbox)
    cookies = []
    try:
        alice.sign_in("alice@example.org")
        cookies.append(alice.cookie())
        assert "No requests" in alice.text()
        alice.shot("requests-empty")

        # A bad field: the name's one-line error next to it; nothing is made.
        alice.click("New request")
        Select(alice.driver.find_element(By.ID, "instance")).select_by_value("i-sample")
        alice.driver.find_element(By.ID, "name").send_keys("web demo ")
        Select(alice.driver.find_element(By.ID, "disk_format")).select_by_value("qcow2")
        alice.click("Ask")
        error = alice.driver.find_element(By.ID, "name-error").text
        assert "starts or ends with white space" in error, alice.text()
        alice.shot("form-error")
        name = alice.driver.find_element(By.ID, "name")
        name.clear()
        name.send_keys("web demo")
        alice.click("Ask")
        rid = _wait(
            "the request's page",
            lambda: re.search(r"/web/requests/(ir-[0-9a-f]{12})$", alice.driver.current_url),
        )
        rid = rid.group(1)
        assert "pending" in alice.text() and "alice" in alice.text()
        alice.shot("request-pending")

        # A form from a session that ended (alice signed in again in another tab): refused.
        alice.get("/web/requests/new")
        first = alice.driver.current_window_handle
        alice.driver.switch_to.new_window("tab")
        alice.sign_in("alice@example.org", count=2)
        cookies.append(alice.cookie())
        alice.driver.close()
        alice.driver.switch_to.window(first)
        Select(alice.driver.find_element(By.ID, "instance")).select_by_value("i-sample")
        alice.driver.find_element(By.ID, "name").send_keys("stale")
        alice.click("Ask")
        assert "this form is out of date" in alice.text(), alice.text()
        alice.shot("csrf-refused")

        # root approves from the list of pending requests, having seen what the run will do.
        root.sign_in("root@example.org")
        cookies.append(root.cookie())
        root.click("To approve")
        assert rid in root.text()
        root.shot("requests-pending")
        root.click(rid)
        page = root.text()
        assert "web demo" in page and "qcow2" in page and "boot marker" in page and "secrets" in page
        root.shot("approve")
        root.click("Approve")
        assert "approved" in root.text() or "running" in root.text()

        # alice watches it run (the page updates itself) to completed.
        alice.get(f"/web/requests/{rid}")
        _wait("the run to start", lambda: "stage " in alice.text(), 120, 0.5)
        alice.shot("request-running")
        root.get("/web/workers")
        assert rid in root.text() and "web demo" in root.text()
        root.shot("workers")
        _wait("a later stage", lambda: re.search(r"stage [3-7] of 7", alice.text()), 120, 0.5)
        alice.shot("request-progress")
        _wait("the run to complete", lambda: "Download the artifact" in alice.text() or "error" in
              alice.driver.execute_script("return document.getElementById('progress').dataset.state"), 300, 1)  # fmt: skip
        assert "Download the artifact" in alice.text(), alice.text()
        assert "Notebook 50-verify" in alice.text()
        alice.shot("request-completed")
        alice.driver.set_window_size(390, 844)  # a phone
        alice.driver.save_screenshot(str(SCREENS / "alice-phone-request.png"))
        width = alice.driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a phone"
        alice.driver.set_window_size(1000, 800)
        sha = re.search(r"sha256 ([0-9a-f]{64})", alice.text())
        assert sha, alice.text()

        # The download, byte for byte what the run made.
        alice.click("Download the artifact", navigates=False)
        done = _wait(
            "the download", lambda: [p for p in alice.downloads.iterdir() if p.suffix == ".qcow2"], 60, 0.5
        )
        digest = hashlib.sha256(done[0].read_bytes()).hexdigest()
        assert digest == sha.group(1)

        # The report.
        alice.click("The report")
        assert rid in alice.text() or "web demo" in alice.text(), alice.text()
        alice.shot("report")
        alice.driver.back()

        # root signs out; bob signs in there and cannot see alice's request.
        root.get("/web/requests")
        root.shot("requests-admin")
        root.click("Sign out")
        root.who = "bob"
        root.sign_in("bob@example.org")
        cookies.append(root.cookie())
        root.get(f"/web/requests/{rid}")
        assert f"no image request {rid}" in root.text()
        root.shot("other-users-request")
        assert rid not in (root.get("/web/requests") or root.text())
    finally:
        alice.quit()
        root.quit()
    assert_no_secrets(
        service, mailbox, [*cookies, *(link.split("token=")[1] for link in alice.links + root.links)]
    )
