"""A minimal W3C WebDriver client over urllib: chromedriver drives Debian's headless Chromium.

Only what the browser tests use: a session, navigation, elements by CSS selector, click, typed
keys, text and properties, cookies, scripts and screenshots. Every call has a timeout; an error
from the driver is raised with the driver's own message.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request

from harness import die_with_parent, free_port, wait_for

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

# Headless, no sandbox (root), and nothing that reaches for the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-crash-reporter",
    "--disable-breakpad",
    "--window-size=1280,1100",
]


class WebDriverError(AssertionError):
    pass


class Browser:
    """chromedriver on a free port and one browser session with a fresh profile and download
    directory (both in a temp dir)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="alx-chromium-")
        self.downloads = os.path.join(self.dir, "downloads")
        os.mkdir(self.downloads)
        self.port = free_port()
        self.log_path = os.path.join(self.dir, "chromedriver.log")
        # chromedriver leaves Chromium running when it is killed; the shell between takes the
        # whole process group (driver and browser) with it when it gets the test's death signal.
        self.driver = subprocess.Popen(
            ["sh", "-c", 'trap "trap - TERM; kill 0" TERM; "$@" & wait $!', "sh",
             CHROMEDRIVER, f"--port={self.port}", f"--log-path={self.log_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session: str | None = None
        try:
            wait_for("chromedriver to be ready", lambda: self._call("GET", "/status")["ready"], 20)
            caps = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": CHROMIUM_ARGS + [f"--user-data-dir={os.path.join(self.dir, 'profile')}"],
                    "prefs": {
                        "download.default_directory": self.downloads,
                        "download.prompt_for_download": False,
                        "safebrowsing.enabled": False,
                    },
                },
            }
            value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=60)
            self.session = value["sessionId"]
        except BaseException:
            self.quit()
            raise

    # ------------------------------------------------------------------ protocol

    def _call(self, method: str, path: str, body=None, timeout: float = 30):
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json; charset=utf-8")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                v = json.loads(e.read()).get("value", {})
                raise WebDriverError(f"{method} {path}: {v.get('error')}: {v.get('message', '').splitlines()[0:1]}") from None
            except (ValueError, AttributeError):
                raise WebDriverError(f"{method} {path}: HTTP {e.code}") from None
        return payload.get("value")

    def cmd(self, method: str, path: str, body=None, timeout: float = 30):
        assert self.session, "no browser session"
        return self._call(method, f"/session/{self.session}{path}", body, timeout)

    # ------------------------------------------------------------------ commands

    def get(self, url: str):
        self.cmd("POST", "/url", {"url": url}, timeout=60)

    def find(self, css: str) -> str:
        """The element the selector names now (raises if there is none)."""
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def wait_find(self, css: str, timeout: float = 15) -> str:
        return wait_for(f"an element {css!r} on the page", lambda: self.find(css), timeout)

    def click(self, el: str):
        self.cmd("POST", f"/element/{el}/click")

    def clear(self, el: str):
        self.cmd("POST", f"/element/{el}/clear")

    def type(self, el: str, text: str):
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def fill(self, css: str, text: str):
        el = self.find(css)
        self.clear(el)
        self.type(el, text)

    def text(self, el: str) -> str:
        return self.cmd("GET", f"/element/{el}/text")

    def text_of(self, css: str) -> str:
        return self.text(self.find(css))

    def prop(self, el: str, name: str):
        return self.cmd("GET", f"/element/{el}/property/{name}")

    def displayed(self, el: str) -> bool:
        return self.cmd("GET", f"/element/{el}/displayed")

    def select(self, select_css: str, value: str):
        """Chooses the option with `value` in a <select> (clicking the option, as a user does)."""
        self.wait_find(f"{select_css} option[value={json.dumps(value)}]")
        self.click(self.find(f"{select_css} option[value={json.dumps(value)}]"))
        got = self.prop(self.find(select_css), "value")
        if got != value:
            raise WebDriverError(f"{select_css}: selected {got!r}, wanted {value!r}")

    def script(self, js: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": js, "args": list(args)})

    def cookie(self, name: str) -> str:
        return self.cmd("GET", f"/cookie/{name}")["value"]

    def cookies(self) -> list[dict]:
        return self.cmd("GET", "/cookie")

    def screenshot(self, path: str):
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise WebDriverError("the screenshot is not a PNG")
        with open(path, "wb") as f:
            f.write(png)

    def quit(self):
        if self.session:
            try:
                self._call("DELETE", f"/session/{self.session}", timeout=20)
            except Exception:  # noqa: BLE001 - the driver is killed below anyway
                pass
            self.session = None
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-n:])
        except OSError:
            return "(no chromedriver log)"


def wait_download(directory: str, name: str, timeout: float = 20) -> str:
    """The finished download `name` in `directory`. Chromium writes a hidden temp file, then
    NAME.crdownload, then renames it: done is `name` present and nothing else in progress."""

    def done():
        names = os.listdir(directory)
        busy = [n for n in names if n.startswith(".") or n.endswith(".crdownload")]
        return os.path.join(directory, name) if name in names and not busy else None

    path = wait_for(f"the download {name} in {directory}", done, timeout)
    others = sorted(set(os.listdir(directory)) - {name})
    if others:
        raise AssertionError(f"unexpected files beside {name} in {directory}: {others}")
    return path
