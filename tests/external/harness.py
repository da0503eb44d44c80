"""Shared pieces of the external tests: a free port, a TOML writer for airlockd's
configuration (derived from its embedded default), an airlockd process in a private temp dir,
the ui's HTTP API, and the historian's database.

Standard library only. Every wait is bounded and says what it waited for when it gives up.
"""

from __future__ import annotations

import http.client
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import tomllib
import unittest
import urllib.parse

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN_DIR = os.path.abspath(os.environ.get("AIRLOCK_BIN_DIR", os.path.join(ROOT, "target", "debug")))
AIRLOCKD = os.path.join(BIN_DIR, "airlockd")
AIRLOCK = os.path.join(BIN_DIR, "airlock")
# Keep the temp dir of a failed run for a post-mortem (its path is printed).
KEEP = os.environ.get("EXTERNAL_KEEP") == "1"

PASSWORD_RE = re.compile(r'created operator "operator" with password (\S+) -- log in with it')


def die_with_parent():
    """For Popen's preexec_fn: the child gets SIGTERM when the test process dies, however it
    dies (a CI timeout's SIGKILL included), so no airlockd or chromedriver outlives a run."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fatal(AssertionError):
    """A failure no amount of waiting repairs (airlockd exited): wait_for raises it at once."""


def wait_for(what: str, fn, timeout: float, interval: float = 0.2):
    """Calls fn until it returns something truthy; raises AssertionError naming `what` (and
    the last value or exception seen) after `timeout` seconds, or at once on Fatal."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            r = fn()
            if r:
                return r
            last = r
        except Fatal:
            raise
        except Exception as e:  # noqa: BLE001 - reported below when the wait gives up
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


# ------------------------------------------------------------------------- configuration

def default_config() -> dict:
    out = subprocess.run([AIRLOCKD, "--print-default-config"], check=True, capture_output=True, text=True).stdout
    return tomllib.loads(out)


def hmi_config(ui_port: int, device_port: int, with_plcsim: bool, with_ui: bool = True) -> dict:
    """The embedded default with every port moved: the ui on `ui_port`, the device (plcsim's
    listener and field's connection) on `device_port`. Without plcsim, the device is the
    test's own server."""
    cfg = default_config()
    workers = []
    for w in cfg["worker"]:
        if w["name"] == "plcsim" and not with_plcsim:
            continue
        if w["name"] == "ui" and not with_ui:
            continue
        for r in w.get("resource", []):
            if w["name"] == "ui" and r["kind"] == "tcp-listen":
                r["address"] = f"127.0.0.1:{ui_port}"
            elif w["name"] in ("plcsim", "field") and r["kind"] in ("tcp-listen", "tcp-connect"):
                r["address"] = f"127.0.0.1:{device_port}"
        workers.append(w)
    cfg["worker"] = workers
    names = {w["name"] for w in workers}
    cfg["permit"] = [p for p in cfg.get("permit", []) if p["from"] in names]
    # Every resource was moved: a default port left in means the default changed under us.
    text = dumps_toml(cfg)
    for default_port in (":1502\"", ":8080\""):
        assert default_port not in text, f"a default port ({default_port}) survived in the test config"
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _is_table_array(v) -> bool:
    return isinstance(v, list) and v != [] and all(isinstance(x, dict) for x in v)


def dumps_toml(d: dict, prefix: str = "") -> str:
    """Enough of a TOML writer for airlockd's configuration: tables, arrays of tables, and
    scalar or scalar-array values."""
    lines = []
    for k, v in d.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + dumps_toml(v, name)
        elif _is_table_array(v):
            for item in v:
                out += f"\n[[{name}]]\n" + dumps_toml(item, name)
    return out


# ------------------------------------------------------------------------- airlockd

class Airlockd:
    """One airlockd in a fresh temp dir (its own state and runtime directories)."""

    def __init__(self, cfg: dict, name: str):
        # Short: the control socket's path must fit in sun_path (108 bytes).
        self.dir = tempfile.mkdtemp(prefix=f"alx-{name[:16]}-")
        # A root airlockd gives workers their own uids: they must be able to traverse the
        # parents of their state directories (mkdtemp's 0700 would refuse them).
        os.chmod(self.dir, 0o711)
        self.state = os.path.join(self.dir, "state")
        self.run = os.path.join(self.dir, "run")
        for d in (self.state, self.run):
            os.mkdir(d, 0o700)
        self.config = os.path.join(self.dir, "airlock.toml")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(dumps_toml(cfg))
        self.log_path = os.path.join(self.dir, "airlockd.log")
        self.socket = os.path.join(self.run, "control.sock")
        self.proc: subprocess.Popen | None = None
        self.failed = False

    def start(self):
        env = dict(os.environ, STATE_DIRECTORY=self.state, RUNTIME_DIRECTORY=self.run)
        env.setdefault("RUST_LOG", "info")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [AIRLOCKD, "--config", self.config],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def assert_alive(self):
        if self.proc.poll() is not None:
            raise Fatal(f"airlockd exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def status(self) -> dict:
        self.assert_alive()
        r = subprocess.run(
            [AIRLOCK, "status", "--socket", self.socket, "--json"], capture_output=True, text=True, timeout=10
        )
        if r.returncode != 0:
            raise AssertionError(f"airlock status failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def workers(self) -> dict[str, dict]:
        return {w["name"]: w for w in self.status()["workers"]}

    def wait_running(self, names, timeout: float = 30):
        def all_running():
            self.assert_alive()
            ws = self.workers()
            states = {n: str(ws.get(n, {}).get("state")).lower() for n in names}
            return states if all(s == "running" for s in states.values()) else None

        try:
            wait_for(f"workers {sorted(names)} to be running", all_running, timeout)
        except Fatal:
            raise
        except AssertionError as e:
            raise AssertionError(f"{e}\nairlockd log tail:\n{self.log_tail()}") from None

    def password(self, timeout: float = 30) -> str:
        def find():
            self.assert_alive()
            m = PASSWORD_RE.search(self.log())
            return m.group(1) if m else None

        return wait_for('the auth worker\'s "created operator" line in the log', find, timeout)

    def stop(self, timeout: float = 15):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"airlockd did not stop within {timeout} s of SIGTERM")
        self._log.close()

    def cleanup(self):
        if self.failed or KEEP:
            print(f"\n[external] kept {self.dir} (airlockd.log, state/, airlock.toml)")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


    # The historian's database, read-only (the historian keeps writing it).
    @property
    def db_path(self) -> str:
        return os.path.join(self.state, "workers", "historian", "history.sqlite3")

    def query(self, sql: str, params=()) -> list[tuple]:
        uri = "file:" + urllib.parse.quote(self.db_path) + "?mode=ro"
        con = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()


class AirlockTestCase(unittest.TestCase):
    """Removes the temp dir of `self.airlockd` after a passing test; after a failing one, prints
    the log's tail and keeps the dir (log, state, database) for a post-mortem."""

    airlockd: Airlockd | None = None

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result is not None else 0
        out = super().run(result)
        airlockd = self.__dict__.get("airlockd")
        if airlockd is not None:
            failed = result is not None and len(result.failures) + len(result.errors) > before
            if failed:
                airlockd.failed = True
                print(f"\n[external] airlockd log tail of {self.id()}:\n{airlockd.log_tail(60)}")
            airlockd.cleanup()
        return out


# ------------------------------------------------------------------------- the ui's HTTP API

class Api:
    """The ui's JSON API over one cookie (a session after login)."""

    def __init__(self, port: int):
        self.port = port
        self.cookie: str | None = None

    def request(self, method: str, path: str, body=None, raw: bool = False):
        """(status, headers, decoded JSON or bytes if raw / not JSON)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers["Cookie"] = f"airlock_session={self.cookie}"
        try:
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            payload = r.read()
            hdrs = r.getheaders()
        finally:
            c.close()
        if raw:
            return r.status, hdrs, payload
        ctype = dict((k.lower(), v) for k, v in hdrs).get("content-type", "")
        if "json" in ctype:
            return r.status, hdrs, json.loads(payload)
        return r.status, hdrs, payload

    def login(self, user: str, password: str):
        status, hdrs, body = self.request("POST", "/api/login", {"user": user, "password": password})
        assert status == 200, f"login: HTTP {status}: {body!r}"
        for k, v in hdrs:
            if k.lower() == "set-cookie":
                m = re.match(r"\s*airlock_session=([^;]*)", v)
                if m:
                    self.cookie = m.group(1)
        assert self.cookie, f"login answered 200 but set no airlock_session cookie: {hdrs}"
        return body

    def get(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, f"GET {path}: HTTP {status}: {body!r}"
        return body

    def post(self, path: str, body: dict):
        status, _, out = self.request("POST", path, body)
        assert status == 200, f"POST {path} {body}: HTTP {status}: {out!r}"
        return out

    def values(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.get("/api/values")["tags"]}

    def setpoint(self, tag: str, value: float) -> dict:
        return self.post("/api/setpoint", {"tag": tag, "value": value})


def wait_http(port: int, timeout: float = 30):
    """Until something answers HTTP on the port (the ui is up)."""

    def answers():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            c.request("GET", "/")
            return c.getresponse().status
        finally:
            c.close()

    return wait_for(f"HTTP on 127.0.0.1:{port}", answers, timeout)

# The default plant's engineering units, by tag (supervisor/default.toml, [settings.plant]).
UNITS = {
    "level": "%",
    "temperature": "°C",
    "inflow": "m³/h",
    "pressure": "bar",
    "inlet_valve": "%",
    "heater_sp": "°C",
    "outlet_valve": "%",
}
