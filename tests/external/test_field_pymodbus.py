"""The field layer against a real Modbus TCP peer: a pymodbus server plays the device (no
plcsim), airlockd runs the rest of the default HMI on free ports, and the test checks what the
operator sees through the ui's HTTP API and what the historian stored.

Each test gets its own device port, ui port, airlockd and temp dir.
"""

from __future__ import annotations

import time
import unittest

from pymodbus.constants import ExcCodes

from device import GarbageDevice, PymodbusDevice, Registers
from harness import UNITS, Airlockd, AirlockTestCase, Api, Fatal, free_port, hmi_config, wait_for, wait_http

# The plant's registers (the default configuration's [settings.plant]): the test's oracle.
LEVEL, TEMPERATURE, INFLOW, PRESSURE = 0, 1, 2, 3
INLET, HEATER_SP, OUTLET = 100, 101, 102
TAGS = ["level", "temperature", "inflow", "pressure", "inlet_valve", "heater_sp", "outlet_valve"]

# A tank at 50 %, 20 °C, nothing alarming; valves and heater as plcsim starts them.
INITIAL_INPUTS = {LEVEL: 500, TEMPERATURE: 200, INFLOW: 120, PRESSURE: 300}
INITIAL_HOLDINGS = {INLET: 400, HEATER_SP: 400, OUTLET: 500}

VALUES_TIMEOUT = 15  # s: field polls every 500 ms
RECOVERY_TIMEOUT = 30  # s: the supervisor reconnects with backoff


def u16(v: int) -> int:
    return v & 0xFFFF


class FieldAgainstPymodbus(AirlockTestCase):
    def setUp(self):
        self.device_port = free_port()
        self.ui_port = free_port()
        self.regs = Registers(INITIAL_INPUTS, INITIAL_HOLDINGS)
        self.device = PymodbusDevice(self.device_port, self.regs)
        self.device.start()
        self.addCleanup(self.device.stop)
        self.garbage: GarbageDevice | None = None
        self.airlockd = Airlockd(hmi_config(self.ui_port, self.device_port, with_plcsim=False), self.id().split(".")[-1])
        self.airlockd.start()
        self.addCleanup(self.airlockd.stop)
        self.airlockd.wait_running(["field", "logic", "historian", "auth", "ui"])
        password = self.airlockd.password()
        wait_http(self.ui_port)
        self.api = Api(self.ui_port)
        self.api.login("operator", password)
        self.t0 = int(time.time() * 1000)
        # The initial registers as the operator sees them: the link works before any test.
        self.wait_values({"level": 50.0, "temperature": 20.0, "heater_sp": 40.0}, "the initial device values")

    # ------------------------------------------------------------------ helpers

    def wait_values(self, expected: dict[str, float], what: str, timeout: float = VALUES_TIMEOUT) -> dict:
        """Until /api/values shows exactly `expected` (engineering values) and no fault."""

        def check():
            vals = self.api.values()
            got = {name: vals[name]["value"] for name in expected}
            faults = {vals[name]["fault"] for name in expected}
            return vals if got == expected and faults == {None} else None

        try:
            return wait_for(what, check, timeout)
        except Fatal:
            raise
        except AssertionError:
            vals = self.api.values()
            shown = {n: (vals[n]["value"], vals[n]["fault"]) for n in expected}
            raise AssertionError(f"{what}: expected {expected}, /api/values shows (value, fault) {shown}") from None

    def wait_fault(self, what: str, accept=lambda fault: True, timeout: float = VALUES_TIMEOUT) -> str:
        """Until every tag in /api/values carries the same fault that `accept`s; returns it."""

        def check():
            faults = {t["fault"] for t in self.api.values().values()}
            if len(faults) == 1:
                (f,) = faults
                if isinstance(f, str) and f and accept(f):
                    return f
            return None

        return wait_for(what, check, timeout)

    def field(self) -> dict:
        return self.airlockd.workers()["field"]

    def assert_field_not_restarted(self, pid: int):
        w = self.field()
        self.assertEqual(str(w["state"]).lower(), "running", f"field worker: {w}")
        self.assertEqual(w["restarts"], 0, f"the field worker restarted: {w}")
        self.assertEqual(w["pid"], pid, "the field worker is a different process")

    def samples_at(self, ts: int) -> dict[str, tuple[int, float]]:
        rows = self.airlockd.query("SELECT tag, raw, value FROM samples WHERE ts = ?", (ts,))
        return {tag: (raw, value) for tag, raw, value in rows}

    # ------------------------------------------------------------------ (a) reads

    def test_input_registers_arrive_scaled_in_values_and_historian(self):
        # Distinct raw values in every input register, a negative temperature among them.
        self.regs.set_input(LEVEL, 623)
        self.regs.set_input(TEMPERATURE, u16(-57))
        self.regs.set_input(INFLOW, 1234)
        self.regs.set_input(PRESSURE, 256)
        expected = {
            "level": 62.3,
            "temperature": -5.7,
            "inflow": 12.34,
            "pressure": 2.56,
            "inlet_valve": 40.0,
            "heater_sp": 40.0,
            "outlet_valve": 50.0,
        }
        vals = self.wait_values(expected, "the new input registers in /api/values")
        self.assertEqual([t for t in TAGS if t in vals], TAGS, "every tag of the plant is listed")
        units = {n: vals[n]["unit"] for n in TAGS}
        self.assertEqual(units, UNITS)
        self.assertEqual({n: vals[n]["writable"] for n in TAGS if vals[n]["writable"]}, dict.fromkeys(
            ["inlet_valve", "heater_sp", "outlet_valve"], True))
        self.assertEqual((vals["heater_sp"]["min"], vals["heater_sp"]["max"]), (10.0, 90.0))
        now = int(time.time() * 1000)
        self.assertTrue(self.t0 - 1000 <= vals["level"]["ts_ms"] <= now, f"ts_ms {vals['level']['ts_ms']} not in this test")

        # The historian stored the same read: one row per tag at one timestamp, raw and scaled.
        def stored():
            rows = self.airlockd.query(
                "SELECT ts FROM samples WHERE tag = 'level' AND raw = 623 AND ts >= ? ORDER BY ts LIMIT 1", (self.t0,)
            )
            return rows[0][0] if rows else None

        ts = wait_for("a stored sample with level raw 623", stored, VALUES_TIMEOUT)
        self.assertEqual(
            self.samples_at(ts),
            {
                "level": (623, 62.3),
                "temperature": (u16(-57), -5.7),
                "inflow": (1234, 12.34),
                "pressure": (256, 2.56),
                "inlet_valve": (400, 40.0),
                "heater_sp": (400, 40.0),
                "outlet_valve": (500, 50.0),
            },
        )
        # The trend over the span in which the device said 623 shows exactly 62.3.
        def span():
            (first, last, n), = self.airlockd.query(
                "SELECT MIN(ts), MAX(ts), COUNT(*) FROM samples WHERE tag = 'level' AND raw = 623 AND ts >= ?",
                (self.t0,),
            )
            return (first, last, n) if n >= 3 else None

        first, last, n = wait_for("three stored samples with level raw 623", span, VALUES_TIMEOUT)
        points = self.api.get(f"/api/trend?tag=level&from={first}&to={last + 1}")["points"]
        self.assertTrue(1 <= len(points) <= n, f"{len(points)} points for {n} samples")
        self.assertEqual({v for _, v in points}, {62.3}, points)
        self.assertTrue(all(first - 1000 <= ts <= last for ts, _ in points), points)

        # Values follow the device, not a coincidence: change one register again.
        self.regs.set_input(LEVEL, 624)
        self.wait_values({"level": 62.4}, "level 62.4 after the register changed to 624")
        self.assertGreater(self.regs.read_count(), 0)

    # ------------------------------------------------------------------ (b) writes

    def test_setpoint_accepted_reaches_holding_register_exactly(self):
        self.assertEqual(self.regs.writes_to(HEATER_SP), [])
        verdict = self.api.setpoint("heater_sp", 55.5)
        self.assertEqual(verdict, {"accepted": True, "reason": "accepted"})
        self.assertEqual(self.regs.get_holding(HEATER_SP), 555)
        self.assertEqual(self.regs.writes_to(HEATER_SP), [555], "exactly one write of raw 555 to register 101")
        # A second setpoint, on another register.
        verdict = self.api.setpoint("inlet_valve", 45.5)
        self.assertEqual(verdict, {"accepted": True, "reason": "accepted"})
        self.assertEqual(self.regs.writes_to(INLET), [455])
        self.assertEqual(self.regs.writes, [(HEATER_SP, 555), (INLET, 455)], "no other register was written")
        # Read back from the device on the next polls.
        self.wait_values({"heater_sp": 55.5, "inlet_valve": 45.5}, "the written setpoints read back")
        events = self.airlockd.query(
            "SELECT kind, tag, user, value, text FROM events WHERE kind = 'setpoint' AND ts >= ? ORDER BY ts", (self.t0,)
        )
        self.assertEqual(events, [("setpoint", "heater_sp", "operator", 55.5, "accepted"),
                                  ("setpoint", "inlet_valve", "operator", 45.5, "accepted")])

    def test_setpoint_out_of_range_refused_register_unchanged(self):
        verdict = self.api.setpoint("heater_sp", 150)
        self.assertEqual(verdict, {"accepted": False, "reason": "150 °C is above the maximum 90 °C"})
        verdict = self.api.setpoint("heater_sp", 5)
        self.assertEqual(verdict, {"accepted": False, "reason": "5 °C is below the minimum 10 °C"})
        # Three polls later the device still holds the old value and saw no write at all.
        time.sleep(1.5)
        self.assertEqual(self.regs.get_holding(HEATER_SP), 400)
        self.assertEqual(self.regs.writes, [])
        self.wait_values({"heater_sp": 40.0}, "heater_sp unchanged at 40.0")
        refused = self.airlockd.query(
            "SELECT kind, tag, user, value, text FROM events WHERE kind = 'refused' AND ts >= ? ORDER BY ts", (self.t0,)
        )
        self.assertEqual(refused, [("refused", "heater_sp", "operator", 150.0, "150 °C is above the maximum 90 °C"),
                                   ("refused", "heater_sp", "operator", 5.0, "5 °C is below the minimum 10 °C")])

    def test_setpoint_refused_by_rate_and_interlock_register_unchanged(self):
        # 40 → 75 °C in one step is more than 30 °C/s.
        verdict = self.api.setpoint("heater_sp", 75)
        self.assertFalse(verdict["accepted"], verdict)
        self.assertEqual(
            verdict["reason"],
            "change of 35.0 °C exceeds the allowed rate of 30 °C/s (at most 30.0 °C now)",
        )
        # The level drops below 20 %: the heater may not be raised.
        self.regs.set_input(LEVEL, 150)
        self.wait_values({"level": 15.0}, "level 15.0")
        verdict = self.api.setpoint("heater_sp", 45)
        self.assertEqual(
            verdict,
            {
                "accepted": False,
                "reason": "interlock: the heater may not be raised while the level is below 20 % "
                "(the element must be covered)",
            },
        )
        time.sleep(1.0)
        self.assertEqual(self.regs.get_holding(HEATER_SP), 400)
        self.assertEqual(self.regs.writes, [])

    # ------------------------------------------------------------------ (c) device restart

    def test_device_restart_reports_fault_then_values_resume_without_field_restart(self):
        pid = self.field()["pid"]
        self.assert_field_not_restarted(pid)
        t_stop = int(time.time() * 1000)
        self.device.stop()
        fault = self.wait_fault("a fault in /api/values after the device stopped")
        # A setpoint now is refused by logic, naming the fault; nothing reaches the device.
        verdict = self.api.setpoint("heater_sp", 45)
        self.assertFalse(verdict["accepted"], verdict)
        self.assertTrue(verdict["reason"].startswith("the device is not answering ("), verdict)
        # While it is off the device's level changes: the value after the restart is new.
        self.regs.set_input(LEVEL, 711)
        time.sleep(2)  # several failed polls and reconnects
        self.assert_field_not_restarted(pid)
        self.device.start()  # same port, same registers
        self.wait_values({"level": 71.1, "temperature": 20.0}, "values after the device came back", RECOVERY_TIMEOUT)
        self.assert_field_not_restarted(pid)
        self.assertEqual(self.regs.writes, [], "the refused setpoint never reached the device")
        # The historian has the fault episode and new samples after it.
        faults = self.airlockd.query(
            "SELECT text FROM events WHERE kind = 'fault' AND ts >= ? ORDER BY ts", (t_stop,)
        )
        self.assertIn(fault, [f for (f,) in faults])
        after = self.airlockd.query("SELECT COUNT(*) FROM samples WHERE tag = 'level' AND raw = 711")
        self.assertGreater(after[0][0], 0, "no sample with the new level stored after the restart")

    def test_modbus_exceptions_from_device_reported_write_failure_told_to_operator(self):
        pid = self.field()["pid"]
        # The device refuses writes (exception 4, device failure): logic passed the setpoint,
        # the field layer's failure is the operator's answer, and the register keeps its value.
        self.regs.fail(writes=ExcCodes.DEVICE_FAILURE)
        verdict = self.api.setpoint("heater_sp", 45)
        self.assertEqual(
            verdict,
            {
                "accepted": False,
                "reason": "the field layer failed: device write failed: "
                "device answered with an error or garbage: SlaveDeviceFailure",
            },
        )
        self.assertEqual(self.regs.get_holding(HEATER_SP), 400)
        self.assertEqual(self.regs.writes, [])
        # The device refuses reads (exception 6, busy): a fault, no crash.
        self.regs.fail(reads=ExcCodes.DEVICE_BUSY)
        self.wait_fault("the device's exception as the fault in /api/values",
                        accept=lambda f: f == "device answered with an error or garbage: SlaveDeviceBusy")
        self.assert_field_not_restarted(pid)
        # It recovers: reads and the same write go through.
        self.regs.fail()
        self.regs.set_input(LEVEL, 555)
        self.wait_values({"level": 55.5}, "values after the device stopped refusing", RECOVERY_TIMEOUT)
        self.assertEqual(self.api.setpoint("heater_sp", 45), {"accepted": True, "reason": "accepted"})
        self.assertEqual(self.regs.writes, [(HEATER_SP, 450)])
        self.assert_field_not_restarted(pid)

    # ------------------------------------------------------------------ (d) garbage

    def test_garbage_answers_reported_as_fault_field_survives_values_resume(self):
        pid = self.field()["pid"]
        self.device.stop()
        self.garbage = GarbageDevice(self.device_port)
        self.garbage.start()
        self.addCleanup(self.garbage.stop)
        t_garbage = int(time.time() * 1000)
        # Every kind of garbage is served at least once (one kind per request, in turn).
        wait_for(
            f"the garbage device to serve each of its {len(GarbageDevice.KINDS)} kinds",
            lambda: all(n > 0 for n in self.garbage.served().values()),
            RECOVERY_TIMEOUT,
        )
        self.wait_fault("a fault in /api/values while the device answers garbage",
                        accept=lambda f: any(p in f for p in GarbageDevice.FAULTS.values()))
        self.assert_field_not_restarted(pid)
        t_back = int(time.time() * 1000)
        # Nothing the garbage device said was taken for a reading.
        stored = self.airlockd.query("SELECT COUNT(*) FROM samples WHERE ts > ? AND ts < ?", (t_garbage + 1000, t_back))
        self.assertEqual(stored[0][0], 0, "samples were stored while the device answered only garbage")
        faults = [f for (f,) in self.airlockd.query(
            "SELECT text FROM events WHERE kind = 'fault' AND ts >= ? ORDER BY ts", (t_garbage,))]
        # One event per change of fault text: each kind of garbage was told apart.
        for kind, pattern in GarbageDevice.FAULTS.items():
            self.assertTrue(any(pattern in f for f in faults), f"{kind}: no fault event with {pattern!r}: {faults}")
        # The real device is back: values resume with its new content.
        self.garbage.stop()
        self.regs.set_input(LEVEL, 432)
        self.device.start()
        self.wait_values({"level": 43.2}, "values after the real device came back", RECOVERY_TIMEOUT)
        self.assert_field_not_restarted(pid)


if __name__ == "__main__":
    unittest.main()
