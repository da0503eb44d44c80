"""The operator's page in a real browser: headless Chromium driven through chromedriver's
WebDriver API, against airlockd running the default layout (plcsim as the device) on free
ports. What the page shows is checked against the ui's API and the historian's database.

Each test gets its own airlockd, browser profile and download directory, and logs in through
the form. The alarm test leaves a screenshot of the main page in docs/screenshot.png.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import re
import time
import unittest
import urllib.parse

from harness import ROOT, UNITS, Airlockd, AirlockTestCase, Api, free_port, hmi_config, wait_for, wait_http
from webdriver import ELEMENT, Browser, wait_download

SCREENSHOT = os.path.join(ROOT, "docs", "screenshot.png")
CSV_HEADER = ["time_ms", "time_utc", "tag", "value", "unit", "kind", "user", "text"]


def utc(ms: int) -> str:
    t = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class OperatorPage(AirlockTestCase):
    def setUp(self):
        self.ui_port = free_port()
        self.airlockd = Airlockd(hmi_config(self.ui_port, free_port(), with_plcsim=True), self.id().split(".")[-1])
        self.airlockd.start()
        self.addCleanup(self.airlockd.stop)
        self.airlockd.wait_running(["plcsim", "field", "logic", "historian", "auth", "ui"])
        self.password = self.airlockd.password()
        wait_http(self.ui_port)
        self.url = f"http://127.0.0.1:{self.ui_port}/"
        self.b = Browser()
        self.addCleanup(self.b.quit)
        self.b.get(self.url)

    # ------------------------------------------------------------------ helpers

    def login(self):
        self.b.wait_find("#user")
        wait_for("the login form to be shown", lambda: self.b.displayed(self.b.find("#login-view")), 10)
        self.b.fill("#user", "operator")
        self.b.fill("#password", self.password)
        self.b.click(self.b.find("#login"))
        wait_for("the operator's name in #who", lambda: self.b.text_of("#who") == "operator", 15)
        self.assertFalse(self.b.displayed(self.b.find("#login-view")), "the login form is still shown")

    def api(self) -> Api:
        """The ui's API with the browser's own session cookie."""
        api = Api(self.ui_port)
        api.cookie = self.b.cookie("airlock_session")
        return api

    def write_setpoint(self, tag: str, value: str) -> str:
        """Writes through the form; returns the verdict the page shows."""
        self.b.select("#sp-tag", tag)
        self.b.fill("#sp-value", value)
        self.b.click(self.b.find("#sp-write"))
        return wait_for(
            f"a verdict for {tag} = {value} in #sp-verdict",
            lambda: (v := self.b.text_of("#sp-verdict")) not in ("", "writing…") and v,
            15,
        )

    def value_text(self, tag: str) -> str:
        return self.b.text_of(f"#value-{tag}")

    # ------------------------------------------------------------------ tests

    def test_login_wrong_then_right_password_shows_operator_and_live_values(self):
        self.b.wait_find("#user")
        self.b.fill("#user", "operator")
        self.b.fill("#password", "not-the-password")
        self.b.click(self.b.find("#login"))
        err = wait_for("a login error", lambda: self.b.text_of("#login-error"), 15)
        self.assertEqual(err, "wrong user name or password")
        self.assertEqual(self.b.text_of("#who"), "")
        self.login()
        # The level moves (inlet 40 %, outlet 50 %): the page shows it moving.
        first = wait_for("a number in #value-level", lambda: re.fullmatch(r"-?\d+(\.\d+)?", self.value_text("level")) and
                         self.value_text("level"), 15)
        changed = wait_for(
            f"#value-level to change from {first}", lambda: (t := self.value_text("level")) != first and t, 15
        )
        self.assertRegex(changed, r"^\d+(\.\d+)?$")
        # What the page shows is what the API says (within one refresh).
        api_level = self.api().values()["level"]["value"]
        self.assertLess(abs(float(self.value_text("level")) - api_level), 1.0)
        # Every tag has its value cell, and the configured unit beside it.
        for tag, unit in UNITS.items():
            self.assertRegex(self.value_text(tag), r"^-?\d+(\.\d+)?$", f"value of {tag}")
            shown = self.b.script("return arguments[0].nextElementSibling.textContent;", {ELEMENT: self.b.find(f"#value-{tag}")})
            self.assertEqual(shown, unit, f"unit of {tag}")

    def test_heater_setpoint_raises_temperature_alarm_acknowledged_in_page(self):
        self.login()
        t0 = int(time.time() * 1000)
        self.assertEqual(self.write_setpoint("heater_sp", "70"), "accepted")
        # plcsim's temperature follows the setpoint; above 55 °C the high alarm is raised.
        ack = self.b.wait_find("#ack-temperature-high", 45)
        row = self.b.text(self.b.find("#alarms-body"))
        self.assertIn("active, unacknowledged", row)
        self.b.click(ack)
        wait_for(
            "the alarm row to say 'acknowledged by operator'",
            lambda: "active, acknowledged by operator" in self.b.text(self.b.find("#alarms-body")),
            15,
        )
        self.assertEqual(self.b.find_all("#ack-temperature-high"), [], "the acknowledge button is still there")
        alarms = [a for a in self.api().get("/api/alarms")["alarms"] if a["tag"] == "temperature"]
        self.assertEqual(len(alarms), 1, alarms)
        self.assertEqual(
            {k: alarms[0][k] for k in ("kind", "limit", "active", "acked_by")},
            {"kind": "high", "limit": 55.0, "active": True, "acked_by": "operator"},
        )
        self.assertGreater(alarms[0]["value"], 55.0)
        events = self.airlockd.query(
            "SELECT kind, tag, user, text FROM events WHERE ts >= ? AND tag IN ('temperature', 'heater_sp') ORDER BY ts",
            (t0,),
        )
        self.assertEqual(
            events,
            [
                ("setpoint", "heater_sp", "operator", "accepted"),
                ("alarm", "temperature", None, "high alarm raised (limit 55)"),
                ("ack", "temperature", "operator", "high alarm acknowledged"),
            ],
        )
        # The main page for the docs: the temperature's trend over the last 5 minutes.
        self.b.select("#trend-tag", "temperature")
        self.b.select("#trend-range", "300000")
        wait_for("a trend of several points", lambda: (m := re.match(r"(\d+) points", self.b.text_of("#trend-msg")))
                 and int(m.group(1)) >= 5, 30)
        self.b.script("document.activeElement.blur(); window.scrollTo(0, 0);")
        self.b.screenshot(SCREENSHOT)
        self.assertGreater(os.path.getsize(SCREENSHOT), 10_000)

    def test_setpoint_from_form_reaches_device(self):
        self.login()
        t0 = int(time.time() * 1000)
        self.assertEqual(self.write_setpoint("outlet_valve", "35"), "accepted")
        # Read back from plcsim's holding register 102 by the field layer: raw 350.
        rows = wait_for(
            "a sample of outlet_valve read back from the device as raw 350",
            lambda: self.airlockd.query(
                "SELECT raw, value FROM samples WHERE tag = 'outlet_valve' AND ts > ? AND raw = 350", (t0,)
            ),
            15,
        )
        self.assertEqual(rows[0], (350, 35.0))
        wait_for("#value-outlet_valve to show 35", lambda: self.value_text("outlet_valve") == "35", 15)
        vals = self.api().values()
        self.assertEqual((vals["outlet_valve"]["value"], vals["outlet_valve"]["fault"]), (35.0, None))

    def test_out_of_range_setpoint_refused_with_reason_in_page(self):
        self.login()
        t0 = int(time.time() * 1000)
        self.assertEqual(self.write_setpoint("heater_sp", "150"), "150 °C is above the maximum 90 °C")
        self.assertEqual(self.b.prop(self.b.find("#sp-verdict"), "className"), "refused")
        time.sleep(1.5)  # three polls: the device still has its setpoint
        latest = self.airlockd.query("SELECT raw FROM samples WHERE tag = 'heater_sp' ORDER BY ts DESC LIMIT 1")
        self.assertEqual(latest, [(400,)])
        events = self.airlockd.query("SELECT kind, value, text FROM events WHERE tag = 'heater_sp' AND ts >= ?", (t0,))
        self.assertEqual(events, [("refused", 150.0, "150 °C is above the maximum 90 °C")])

    def test_csv_download_matches_historian_rows(self):
        self.login()
        # Some history first, and an operator event in it.
        self.assertEqual(self.write_setpoint("inlet_valve", "45"), "accepted")
        wait_for("at least 6 samples per tag", lambda: self.airlockd.query(
            "SELECT COUNT(*) FROM samples WHERE tag = 'level'")[0][0] >= 6, 20)
        self.b.select("#trend-range", "300000")
        link = self.b.find("#csv")
        self.b.click(link)  # the page sets the link's range on click; Chromium downloads it
        self.assertEqual(self.b.prop(link, "download"), "history.csv")
        path = wait_download(self.b.downloads, "history.csv")
        href = self.b.prop(link, "href")
        q = urllib.parse.parse_qs(urllib.parse.urlparse(href).query)
        frm, to = int(q["from"][0]), int(q["to"][0])
        self.assertEqual(to - frm, 300_000, href)
        self.assertLess(abs(to - time.time() * 1000), 30_000, "the link's range does not end now")
        with open(path, encoding="utf-8", newline="") as f:
            downloaded = list(csv.reader(f))
        time.sleep(1.5)  # every sample read before `to` is stored by now

        samples = self.airlockd.query(
            "SELECT ts, tag, value FROM samples WHERE ts >= ? AND ts <= ? ORDER BY ts, tag", (frm, to)
        )
        events = self.airlockd.query(
            "SELECT ts, tag, value, kind, user, text FROM events WHERE ts >= ? AND ts <= ? ORDER BY ts, tag", (frm, to)
        )
        self.assertGreaterEqual(len(samples), 6 * len(UNITS))
        self.assertIn(("inlet_valve", 45.0, "setpoint", "operator", "accepted"), [e[1:] for e in events])

        def sample_rows(rows):
            out = []
            for r in rows[1:]:
                self.assertEqual(len(r), 8, r)
                if r[5] == "sample":
                    self.assertEqual(r[1], utc(int(r[0])), r)
                    self.assertEqual(r[4], UNITS[r[2]], r)
                    self.assertEqual(r[6:], ["", ""], r)
                    out.append((int(r[0]), r[2], float(r[3])))
            return out

        def by_time_tag_kind_text(e):
            return (e[0], e[1], e[3], e[5])

        def event_rows(rows):
            return sorted(
                ((int(r[0]), r[2], float(r[3]) if r[3] else None, r[5], r[6] or None, r[7])
                 for r in rows[1:] if r[5] != "sample"),
                key=by_time_tag_kind_text,
            )

        # The same link fetched now, with the browser's cookie: exactly the database's rows.
        api = self.api()
        status, _, body = api.request("GET", urllib.parse.urlparse(href).path + "?" + urllib.parse.urlparse(href).query,
                                      raw=True)
        self.assertEqual(status, 200)
        fetched = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
        self.assertEqual(fetched[0], CSV_HEADER)
        self.assertEqual(sample_rows(fetched), samples)
        self.assertEqual(event_rows(fetched), sorted(events, key=by_time_tag_kind_text))

        # The browser's download: the same rows, but for samples still in flight when it ran
        # (read before `to`, stored a few milliseconds later).
        self.assertEqual(downloaded[0], CSV_HEADER)
        got = sample_rows(downloaded)
        self.assertEqual(got, samples[: len(got)], "the download's sample rows differ from the database's")
        missing = samples[len(got):]
        self.assertTrue(all(ts >= to - 1000 for ts, _, _ in missing), f"download lacks older rows: {missing[:3]}")
        self.assertGreaterEqual(len(got), len(samples) - 2 * len(UNITS))

        # Without the session the export is refused.
        status, _, _ = Api(self.ui_port).request("GET", f"/api/export.csv?from={frm}&to={to}")
        self.assertEqual(status, 401)

    def test_logout_ends_session_in_page_and_api(self):
        self.login()
        api = self.api()
        self.assertIn("level", api.values())
        self.b.click(self.b.find("#logout"))
        wait_for("the login form after logout", lambda: self.b.displayed(self.b.find("#login-view")), 15)
        self.assertEqual(self.b.text_of("#who"), "")
        now = int(time.time() * 1000)
        for method, path, body in [
            ("GET", "/api/values", None),
            ("GET", "/api/alarms", None),
            ("GET", f"/api/trend?tag=level&from={now - 60000}&to={now}", None),
            ("GET", f"/api/export.csv?from={now - 60000}&to={now}", None),
            ("POST", "/api/ack", {"tag": "temperature", "kind": "high"}),
            ("POST", "/api/setpoint", {"tag": "outlet_valve", "value": 20}),
            ("POST", "/api/logout", {}),
        ]:
            status, _, _ = api.request(method, path, body)
            self.assertEqual(status, 401, f"{method} {path} with the logged-out session's cookie")
        time.sleep(1.0)
        self.assertEqual(
            self.airlockd.query("SELECT kind, tag FROM events WHERE kind IN ('setpoint', 'refused', 'ack')"), [],
            "a request after logout reached the logic layer",
        )
        self.assertEqual(
            self.airlockd.query("SELECT raw FROM samples WHERE tag = 'outlet_valve' ORDER BY ts DESC LIMIT 1"), [(500,)]
        )


if __name__ == "__main__":
    unittest.main()
