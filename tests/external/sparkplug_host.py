"""The real peers of the multi-site tests: a Mosquitto broker with TLS, passwords, client
certificates and ACLs (Debian's mosquitto, started here on loopback ports), the certificates it
needs (openssl), and a Sparkplug B primary host application written with paho-mqtt and the
pysparkplug decoder, which records everything the edge nodes publish.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from pysparkplug import DataType, Metric, NBirth, NCmd, NData, NDeath

from harness import die_with_parent, free_port, wait_for

GROUP = "plants"
HOST_ID = "scada"


def openssl(*args: str, cwd: str):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {r.stderr.strip()}")


class Pki:
    """A CA, the broker's certificate (broker.test and 127.0.0.1) and client certificates."""

    def __init__(self, d: str):
        self.dir = d
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=airlock test CA", cwd=d)
        self.ca = os.path.join(d, "ca.crt")
        self.broker_cert, self.broker_key = self.issue(
            "broker", "broker.test", "subjectAltName=DNS:broker.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth")

    def issue(self, name: str, cn: str, ext: str) -> tuple[str, str]:
        d = self.dir
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w", encoding="utf-8") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n" + ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
        for f in (f"{name}.crt", f"{name}.key"):
            # The broker drops to the mosquitto user; this is a throwaway test directory.
            os.chmod(os.path.join(d, f), 0o644)
        return os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key")

    def client(self, name: str) -> tuple[str, str]:
        return self.issue(name, name, "extendedKeyUsage=clientAuth")


class Broker:
    """Mosquitto on two loopback listeners, both TLS with the test CA: `port` takes passwords,
    `mtls_port` takes client certificates (the certificate's CN is the user). Each user may
    publish and read only its own Sparkplug topics (ACL)."""

    USERS = {"site-a": "site-a-secret", "host": "host-secret"}

    def __init__(self, pki: Pki, d: str):
        self.dir = d
        self.port = free_port()
        self.mtls_port = free_port()
        passwd = os.path.join(d, "passwd")
        open(passwd, "w").close()
        for user, pw in self.USERS.items():
            subprocess.run(["mosquitto_passwd", "-b", passwd, user, pw], check=True, capture_output=True)
        acl = os.path.join(d, "acl")
        with open(acl, "w", encoding="utf-8") as f:
            for node in ("site-a", "site-b"):
                f.write(f"user {node}\n"
                        f"topic write spBv1.0/{GROUP}/NBIRTH/{node}\n"
                        f"topic write spBv1.0/{GROUP}/NDATA/{node}\n"
                        f"topic write spBv1.0/{GROUP}/NDEATH/{node}\n"
                        f"topic read spBv1.0/{GROUP}/NCMD/{node}\n"
                        f"topic read spBv1.0/{GROUP}/DCMD/{node}/#\n"
                        f"topic read spBv1.0/STATE/{HOST_ID}\n\n")
            f.write(f"user host\ntopic read spBv1.0/{GROUP}/#\ntopic write spBv1.0/{GROUP}/NCMD/#\n"
                    f"topic readwrite spBv1.0/STATE/{HOST_ID}\n")
        for p in (passwd, acl):
            os.chmod(p, 0o644)
        tls = f"cafile {pki.ca}\ncertfile {pki.broker_cert}\nkeyfile {pki.broker_key}\n"
        self.conf = os.path.join(d, "mosquitto.conf")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("per_listener_settings true\npersistence false\nset_tcp_nodelay true\nlog_dest stderr\n"
                    "log_type error\nlog_type warning\nlog_type notice\n"
                    f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                    f"acl_file {acl}\n{tls}"
                    f"listener {self.mtls_port} 127.0.0.1\nallow_anonymous false\nrequire_certificate true\n"
                    f"use_identity_as_username true\nacl_file {acl}\n{tls}")
        self.log_path = os.path.join(d, "mosquitto.log")
        self.proc: subprocess.Popen | None = None

    def start(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        wait_for(f"mosquitto listening on {self.port}", self._listening, 10, 0.1)

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
        import socket
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self._log.close()

    def log_tail(self, n: int = 20) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])


class Link:
    """A site's network link to the broker: a TCP relay on a free port. `cut()` makes it go
    silent without closing anything (bytes stop flowing both ways, as when a line or a router
    fails: no FIN, no RST); `restore()` lets them flow again. New connections during a cut are
    accepted by the kernel and then hang, as a connection into a dead link does."""

    def __init__(self, target_port: int):
        import socket
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        while not self.closed:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            self.flowing.wait()
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            b.settimeout(None)  # a silent link is silent for as long as it is cut
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                self.flowing.wait()
                data = src.recv(65536)
                # Nothing crosses a cut link, not even the end of a connection.
                self.flowing.wait()
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(2)
            except OSError:
                pass

    def cut(self):
        self.flowing.clear()

    def restore(self):
        self.flowing.set()

    def close(self):
        self.closed = True
        self.flowing.set()
        self.listener.close()


class Host:
    """The primary host application: publishes its STATE (retained, QoS 1, with a will saying
    offline), subscribes to the group and records, per edge node and in arrival order, every
    birth, death and data metric. Reconnects by itself while `online`."""

    def __init__(self, broker: Broker, ca: str):
        self.broker = broker
        self.ca = ca
        self.lock = threading.Lock()
        # node -> list of (kind, payload object, arrival monotonic)
        self.messages: dict[str, list[tuple[str, object, float]]] = {}
        self.births: dict[str, NBirth] = {}
        self.errors: list[str] = []
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()

    def _state(self, online: bool, ts: int) -> bytes:
        return ('{"online": %s, "timestamp": %d}' % ("true" if online else "false", ts)).encode()

    def start(self):
        ts = int(time.time() * 1000)
        c = mqtt.Client(client_id=HOST_ID, clean_session=True)
        c.username_pw_set("host", Broker.USERS["host"])
        c.tls_set(ca_certs=self.ca)
        c.will_set(f"spBv1.0/STATE/{HOST_ID}", self._state(False, ts), qos=1, retain=True)
        c.reconnect_delay_set(0.2, 2)

        def on_connect(client, _u, _f, rc):
            if rc != 0:
                self.errors.append(f"connect refused: {rc}")
                return
            client.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
            client.publish(f"spBv1.0/STATE/{HOST_ID}", self._state(True, int(time.time() * 1000)), qos=1,
                           retain=True)
            self.connected.set()

        def on_disconnect(_c, _u, _rc):
            self.connected.clear()

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = self._on_message
        c.connect_async("127.0.0.1", self.broker.port, keepalive=5)
        c.loop_start()
        self.client = c
        wait_for("the primary host connected", self.connected.is_set, 15, 0.05)

    def go_offline(self):
        """A clean outage: STATE offline first (and a second to take what is already in flight
        to it), then disconnect."""
        c = self.client
        info = c.publish(f"spBv1.0/STATE/{HOST_ID}", self._state(False, int(time.time() * 1000)), qos=1, retain=True)
        info.wait_for_publish(5)
        time.sleep(1.0)
        c.disconnect()
        c.loop_stop()
        self.client = None

    def _on_message(self, _c, _u, m):
        parts = m.topic.split("/")
        if len(parts) < 4:
            return
        kind, node = parts[2], parts[3]
        try:
            with self.lock:
                if kind == "NBIRTH":
                    p = NBirth.decode(m.payload)
                    self.births[node] = p
                elif kind == "NDATA":
                    p = NData.decode(m.payload, birth=self.births.get(node))
                elif kind == "NDEATH":
                    p = NDeath.decode(m.payload)
                else:
                    return
                self.messages.setdefault(node, []).append((kind, p, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - recorded and asserted empty by the tests
            self.errors.append(f"{m.topic}: {e!r}")

    def stop(self):
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    # ------------------------------------------------------------------ what was seen

    def of(self, node: str, kind: str) -> list:
        with self.lock:
            return [p for k, p, _ in self.messages.get(node, []) if k == kind]

    def data(self, node: str) -> list[Metric]:
        """Every NDATA metric from `node`, in arrival order."""
        return [m for p in self.of(node, "NDATA") for m in p.metrics]

    def sample_times(self, node: str) -> list[tuple[int, bool]]:
        """(sample time in ms, historical) of every NDATA sample-time metric, in arrival order."""
        return [(m.timestamp, m.is_historical) for m in self.data(node) if m.name == "Node Info/Sample Time"]

    def latest(self, node: str, metric: str):
        """The newest value of `metric` from `node` (by timestamp), births included."""
        best = None
        for m in [*(m for b in self.of(node, "NBIRTH") for m in b.metrics), *self.data(node)]:
            if m.name == metric and not m.is_null and (best is None or m.timestamp >= best.timestamp):
                best = m
        return None if best is None else best.value

    def rebirth(self, node: str):
        self.command(node, [Metric(timestamp=int(time.time() * 1000), name="Node Control/Rebirth",
                                   datatype=DataType.BOOLEAN, value=True)])

    def command(self, node: str, metrics: list[Metric]):
        payload = NCmd(timestamp=int(time.time() * 1000), metrics=tuple(metrics)).encode(include_dtypes=True)
        self.client.publish(f"spBv1.0/{GROUP}/NCMD/{node}", payload, qos=0).wait_for_publish(5)


def new_dir(prefix: str) -> str:
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


def remove(d: str):
    shutil.rmtree(d, ignore_errors=True)
