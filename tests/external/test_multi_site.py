"""Two sites and a central host through a real broker (#19): two airlockd instances, each with
its own plant (a pymodbus device the test drives) and its bridge layer, publish as Sparkplug B
edge nodes to Mosquitto over TLS (site-a with a password, site-b with a client certificate); a
primary host application written with paho-mqtt and pysparkplug records what arrives.

What is checked against what each site's historian stored (its own record of every sample):
nothing lost and nothing reordered across a 30 s broker outage, a primary-host outage and a
kill -9 of airlockd; values flagged historical when they were stored; each plant's live values;
the birth certificates' content; commands refused.
"""

from __future__ import annotations

import os
import re
import signal
import time

from pysparkplug import DataType, Metric

from device import PymodbusDevice, Registers
from harness import Airlockd, AirlockTestCase, Api, free_port, hmi_config, wait_for, wait_http
from sparkplug_host import GROUP, HOST_ID, Broker, Host, Link, Pki, new_dir, remove

POLL_MS = 100
LEVEL, TEMPERATURE, INFLOW, PRESSURE = 0, 1, 2, 3
INLET, HEATER_SP, OUTLET = 100, 101, 102
HOLDINGS = {INLET: 400, HEATER_SP: 400, OUTLET: 500}
PLANTS = {
    "site-a": {LEVEL: 500, TEMPERATURE: 200, INFLOW: 120, PRESSURE: 300},
    "site-b": {LEVEL: 700, TEMPERATURE: 310, INFLOW: 80, PRESSURE: 250},
}
TAGS = ["level", "temperature", "inflow", "pressure", "inlet_valve", "heater_sp", "outlet_valve"]
SAMPLE_TIME = "Node Info/Sample Time"


def site_config(name: str, ui_port: int, device_port: int, broker: Broker, pki: Pki, inbox: int, link: Link) -> dict:
    """The default HMI on free ports, a pymodbus device as the plant, and the bridge: site-a
    authenticates with a password and reaches the broker through `link`, site-b with a client
    certificate, directly."""
    cfg = hmi_config(ui_port, device_port, with_plcsim=False)
    cfg["settings"]["field"]["poll-ms"] = POLL_MS
    cfg["settings"]["logic"] = {"publish-to-bridge": True}
    for w in cfg["worker"]:
        if w["name"] == "logic":
            w["settings"] = ["plant", "logic"]
    bridge = {"group": GROUP, "edge-node": name, "primary-host": HOST_ID, "keepalive-s": 5,
              "tls": {"server-name": "broker.test", "ca": 1}}
    resources = [{"kind": "tcp-connect", "address": f"127.0.0.1:{link.port}"}, {"kind": "file", "path": pki.ca}]
    if name == "site-a":
        secret = os.path.join(broker.dir, f"{name}.password")
        with open(secret, "w", encoding="utf-8") as f:
            f.write(Broker.USERS[name] + "\n")
        resources.append({"kind": "file", "path": secret})
        bridge.update({"username": name, "password": 2})
    else:
        cert, key = pki.client(name)
        resources[0]["address"] = f"127.0.0.1:{broker.mtls_port}"
        resources += [{"kind": "file", "path": cert}, {"kind": "file", "path": key}]
        bridge["tls"].update({"client-cert": 2, "client-key": 3})
    cfg["settings"]["bridge"] = bridge
    cfg["worker"].append({
        "name": "bridge", "executable": "airlock-worker-bridge", "policy": "bridge", "uid": "dynamic",
        "services": ["bridge"], "settings": ["plant", "bridge"],
        "quota": {"inbox-bytes": inbox}, "resource": resources,
    })
    cfg["permit"].append({"from": "logic", "to": "bridge.update", "kind": "send"})
    return cfg


class Site:
    def __init__(self, name: str, broker: Broker, pki: Pki, inbox: int, link: Link):
        self.name = name
        self.regs = Registers(PLANTS[name], HOLDINGS)
        self.device = PymodbusDevice(free_port(), self.regs)
        self.ui_port = free_port()
        self.airlockd = Airlockd(site_config(name, self.ui_port, self.device.port, broker, pki, inbox, link), name)

    def start(self):
        self.device.start()
        self.airlockd.start()

    def wait_running(self):
        self.airlockd.wait_running(["field", "logic", "historian", "auth", "ui", "bridge"])

    def historian_times(self, since: int, until: int) -> list[int]:
        """Every sample the site's historian stored in [since, until] (ms): the oracle."""
        rows = self.airlockd.query("SELECT DISTINCT ts FROM samples WHERE ts BETWEEN ? AND ? ORDER BY ts",
                                   (since, until))
        return [r[0] for r in rows]


class Sites(AirlockTestCase):
    """A broker, a primary host and two sites, all started; the helpers the tests share."""

    inbox = 8 << 20

    def setUp(self):
        self.dir = new_dir("alx-mqtt-")
        self.pki = Pki(self.dir)
        self.broker = Broker(self.pki, self.dir)
        self.broker.start()
        self.addCleanup(self.broker.stop)
        self.host = Host(self.broker, self.pki.ca)
        self.host.start()
        self.addCleanup(self.host.stop)
        self.link = Link(self.broker.port)
        self.addCleanup(self.link.close)
        self.sites = {n: Site(n, self.broker, self.pki, self.inbox, self.link) for n in ("site-a", "site-b")}
        for s in self.sites.values():
            s.start()
            self.addCleanup(s.device.stop)
            self.addCleanup(s.airlockd.stop)
        for s in self.sites.values():
            s.wait_running()
        for n in self.sites:
            self.wait_birth(n)

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result is not None else 0
        out = super().run(result)
        if result is not None and len(result.failures) + len(result.errors) > before:
            for s in self.__dict__.get("sites", {}).values():
                s.airlockd.failed = True
                print(f"\n[external] {s.name}'s airlockd log tail:\n{s.airlockd.log_tail(40)}")
            if "broker" in self.__dict__:
                print(f"\n[external] kept {self.dir}; mosquitto log tail:\n{self.broker.log_tail()}")
        elif "dir" in self.__dict__:
            remove(self.dir)
        for s in self.__dict__.get("sites", {}).values():
            s.airlockd.cleanup()
        return out

    # ------------------------------------------------------------------ helpers

    def wait_birth(self, node: str, after: int = 0, timeout: float = 30):
        return wait_for(f"NBIRTH number {after + 1} from {node}",
                        lambda: len(self.host.of(node, "NBIRTH")) > after, timeout, 0.1)

    def wait_value(self, node: str, metric: str, value, timeout: float = 15):
        wait_for(f"{metric} = {value} from {node} at the host",
                 lambda: self.host.latest(node, metric) == value, timeout, 0.1)

    def wait_caught_up(self, node: str, until_ms: int, timeout: float = 60):
        """Until the host has a live (not historical) sample from after `until_ms`."""
        wait_for(f"a live sample from {node} after {until_ms}",
                 lambda: any(ts > until_ms and not h for ts, h in self.host.sample_times(node)), timeout, 0.2)

    def assert_nothing_lost_or_reordered(self, node: str, since: int, until: int, historical: tuple[int, int] | None):
        """Every sample the site's historian stored in [since, until] reached the host; first
        arrivals are in order (later copies are the unconfirmed data sent again); samples taken
        within `historical` came flagged historical, later ones live."""
        site = self.sites[node]
        stored = site.historian_times(since, until)
        self.assertGreater(len(stored), (until - since) / POLL_MS / 3, f"{node}'s historian stored too few samples")
        seen: dict[int, bool] = {}
        first_order = []
        for ts, hist in self.host.sample_times(node):
            if ts not in seen:
                seen[ts] = hist
                first_order.append(ts)
        missing = [ts for ts in stored if ts not in seen]
        self.assertEqual(missing, [], f"{node}: {len(missing)} of {len(stored)} stored samples never reached the host "
                                      f"(first {missing[:5]})")
        out_of_order = [(a, b) for a, b in zip(first_order, first_order[1:]) if b <= a]
        self.assertEqual(out_of_order, [], f"{node}: samples first arrived out of order")
        if historical is not None:
            lo, hi = historical
            inside = [ts for ts in stored if lo + 1000 <= ts <= hi - 1000]
            self.assertTrue(inside, f"{node}: no samples stored during the outage")
            live = [ts for ts in inside if not seen[ts]]
            self.assertEqual(live, [], f"{node}: samples stored during the outage arrived without the historical flag")
        self.assertEqual(self.host.errors, [], "the host could not decode what it received")



class MultiSite(Sites):
    def test_births_live_values_of_each_plant_and_commands_refused(self):
        for node in self.sites:
            birth = self.host.of(node, "NBIRTH")[0]
            self.assertEqual(birth.seq, 0)
            by_name = {m.name: m for m in birth.metrics}
            for tag in TAGS:
                self.assertEqual(by_name[tag].datatype, DataType.DOUBLE, tag)
            self.assertEqual(by_name["bdSeq"].datatype, DataType.UINT64)
            self.assertEqual(by_name["bdSeq"].value, 0, "the first CONNECT's bdSeq")
            self.assertEqual(by_name["Node Control/Rebirth"].value, False)
            self.assertEqual(by_name["level/Alarm High"].datatype, DataType.BOOLEAN)
            self.assertEqual(by_name["level/Alarm Low"].datatype, DataType.BOOLEAN)
            self.assertEqual(by_name[SAMPLE_TIME].datatype, DataType.DATETIME)
        # Each plant's own values.
        self.wait_value("site-a", "level", 50.0)
        self.wait_value("site-b", "level", 70.0)
        self.wait_value("site-b", "temperature", 31.0)
        # A change at site-a's device reaches the host from site-a only; an alarm with it.
        self.sites["site-a"].regs.set_input(LEVEL, 955)
        self.wait_value("site-a", "level", 95.5)
        self.wait_value("site-a", "level/Alarm High", True)
        self.assertEqual(self.host.latest("site-b", "level"), 70.0)
        self.assertEqual(self.host.latest("site-b", "level/Alarm High"), False)
        # NDATA sequence numbers run on from the birth's 0.
        seqs = [p.seq for p in self.host.of("site-b", "NDATA")[:5]]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        # A remote write is refused and logged; the register is untouched.
        a = self.sites["site-a"]
        self.host.command("site-a", [Metric(timestamp=int(time.time() * 1000), name="heater_sp",
                                            datatype=DataType.DOUBLE, value=80.0)])
        wait_for("the refusal in site-a's log", lambda: "NCMD refused" in a.airlockd.log(), 10, 0.1)
        self.assertEqual(a.regs.get_holding(HEATER_SP), 400)
        self.assertEqual(a.regs.writes_to(HEATER_SP), [])
        # A rebirth request is honoured.
        self.host.rebirth("site-b")
        self.wait_birth("site-b", after=1)
        # The broker kept each site to its own topics (no ACL denial logged for them).
        self.assertNotIn("denied", self.broker.log_tail(200).lower())

    def test_broker_outage_of_30_s_loses_nothing_and_keeps_order(self):
        t0 = int(time.time() * 1000)
        for n in self.sites:
            self.wait_caught_up(n, t0)
        time.sleep(2)
        down = int(time.time() * 1000)
        self.broker.stop()
        # A value that changed while the broker was away arrives, historical.
        time.sleep(10)
        self.sites["site-a"].regs.set_input(PRESSURE, 410)
        time.sleep(20)
        up = int(time.time() * 1000)
        self.broker.start()
        self.host.connected.wait(15)
        for n in self.sites:
            self.wait_birth(n, after=1, timeout=60)
            self.wait_caught_up(n, up, timeout=90)
        end = int(time.time() * 1000) - 1000
        for n in self.sites:
            self.assert_nothing_lost_or_reordered(n, t0, end, (down, up))
            bd = [[m.value for m in b.metrics if m.name == "bdSeq"] for b in self.host.of(n, "NBIRTH")]
            self.assertEqual(bd, [[0], [1]], f"{n}: one more bdSeq for the one CONNECT after the outage")
        pressure = [m for m in self.host.data("site-a") if m.name == "pressure" and m.value == 4.1]
        self.assertTrue(pressure and pressure[0].is_historical, f"the change during the outage: {pressure[:1]}")

    def test_a_silent_link_outage_loses_nothing_published_into_it(self):
        """site-a's link goes silent (no FIN, no RST) for 20 s: what the bridge published into
        it is never confirmed (no PINGRESP), so after its keepalive it reconnects, and once the
        link is back everything since the last confirmation is published again."""
        t0 = int(time.time() * 1000)
        for n in self.sites:
            self.wait_caught_up(n, t0)
        time.sleep(2)
        down = int(time.time() * 1000)
        self.link.cut()
        time.sleep(20)
        up = int(time.time() * 1000)
        self.link.restore()
        self.wait_birth("site-a", after=1, timeout=60)
        for n in self.sites:
            self.wait_caught_up(n, up, timeout=60)
        end = int(time.time() * 1000) - 1000
        for n in self.sites:
            self.assert_nothing_lost_or_reordered(n, t0, end, (down, up) if n == "site-a" else None)
        # The broker declared site-a dead (its will), and site-b never noticed.
        self.assertTrue(self.host.of("site-a", "NDEATH"), "no NDEATH for site-a while its link was silent")
        self.assertEqual(len(self.host.of("site-b", "NBIRTH")), 1, "site-b was born again")
        self.assertIn("did not answer a PINGREQ", self.sites["site-a"].airlockd.log())

    def test_primary_host_outage_stores_and_forwards_as_historical(self):
        t0 = int(time.time() * 1000)
        for n in self.sites:
            self.wait_caught_up(n, t0)
        time.sleep(1)
        down = int(time.time() * 1000)
        self.host.go_offline()
        # The edge nodes stop publishing: NDEATH, then nothing until the host is back.
        time.sleep(10)
        up = int(time.time() * 1000)
        self.host.start()
        for n in self.sites:
            self.wait_caught_up(n, up, timeout=60)
        end = int(time.time() * 1000) - 1000
        for n in self.sites:
            self.assert_nothing_lost_or_reordered(n, t0, end, (down, up))
            self.assertGreaterEqual(len(self.host.of(n, "NBIRTH")), 2, f"{n}: no new birth for the returning host")

    def test_kill_9_of_airlockd_recovers_what_its_journal_held(self):
        a = self.sites["site-a"]
        t0 = int(time.time() * 1000)
        self.wait_caught_up("site-a", t0)
        # Store for a while (the host is away), then kill airlockd while the journal holds it.
        off = int(time.time() * 1000)
        self.host.go_offline()
        time.sleep(5)
        killed = int(time.time() * 1000)
        os.killpg(a.airlockd.proc.pid, signal.SIGKILL)
        a.airlockd.proc.wait(10)
        a.airlockd._log.close()
        time.sleep(1)
        a.airlockd.start()
        a.wait_running()
        self.host.start()
        back = int(time.time() * 1000)
        self.wait_caught_up("site-a", back, timeout=60)
        # Everything stored before the kill arrived (the last second was perhaps not journaled yet).
        self.assert_nothing_lost_or_reordered("site-a", t0, killed - 1000, (off, killed))
        deaths = self.host.of("site-a", "NDEATH")
        self.assertTrue(deaths, "no NDEATH (the will) from site-a")


class FullInbox(Sites):
    """A bridge whose store is full drops updates, never the site's own records."""

    inbox = 16 << 10

    def test_a_full_bridge_inbox_drops_updates_never_the_historians_events(self):
        a = self.sites["site-a"]
        self.broker.stop()
        wait_for("logic told the bridge's inbox is full", lambda: "an update for the bridge was dropped" in a.airlockd.log(),
                 30, 0.2)
        # airlock status says what holds the store, and that it is full.
        bridge = a.airlockd.workers()["bridge"]
        inbox = [b for b in bridge["bounds"] if b.startswith("inbox: ")]
        self.assertEqual(len(inbox), 1, bridge["bounds"])
        waiting, limit = (int(x) for x in re.match(r"inbox: (\d+) of (\d+) bytes", inbox[0]).groups())
        self.assertEqual(limit, self.inbox)
        self.assertGreater(waiting, self.inbox * 3 // 4, inbox[0])
        # The operator's setpoint still reaches the device and the historian's record.
        wait_http(a.ui_port)
        api = Api(a.ui_port)
        api.login("operator", a.airlockd.password())
        verdict = api.setpoint("heater_sp", 45.0)
        self.assertTrue(verdict.get("accepted"), verdict)
        wait_for("the setpoint event in site-a's history",
                 lambda: a.airlockd.query("SELECT count(*) FROM events WHERE kind = 'setpoint'")[0][0] == 1, 15, 0.2)
        self.broker.start()
        self.wait_birth("site-a", after=1, timeout=60)
        wait_for("logic told the bridge takes updates again",
                 lambda: "the bridge takes updates again" in a.airlockd.log(), 30, 0.2)

