#!/usr/bin/env bash
# The HMI's tests against real peers: a pymodbus server as the device (test_field_pymodbus.py),
# headless Chromium through chromedriver as the operator (test_browser.py), and two sites
# publishing through Mosquitto to a paho-mqtt/pysparkplug primary host (test_multi_site.py).
#
#   tests/external/run.sh [field|browser|multi-site|all] [unittest names...]
#
# Installs what is missing (Debian: chromium, chromium-driver, mosquitto, openssl,
# python3-venv; a venv with pymodbus and pysparkplug under target/), builds the binaries (`cargo build --workspace --bins`; skipped when
# AIRLOCK_BIN_DIR names a directory of built binaries), runs the tests with unittest and ends
# with `external: N passed, M failed`. Exit status 0 only if every test ran and passed.
# Runs as root on a fresh Debian machine with no stdin (CI=true). EXTERNAL_KEEP=1 keeps every
# test's temp dir (airlockd.log, state/, the historian's database); a failing test's is kept
# anyway and its path printed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
export DEBIAN_FRONTEND=noninteractive

PYMODBUS_VERSION=3.16.1
# pysparkplug 0.6.1 decodes Sparkplug B (Apache-2.0); it pins paho-mqtt below 2 (1.6.1).
PYSPARKPLUG_VERSION=0.6.1
venv=${EXTERNAL_VENV:-$root/target/pyenv}
which=${1:-all}
[ $# -gt 0 ] && shift
case $which in
  field) modules=(test_field_pymodbus) ;;
  browser) modules=(test_browser) ;;
  multi-site) modules=(test_multi_site) ;;
  all) modules=(test_field_pymodbus test_browser test_multi_site) ;;
  *) echo "usage: $0 [field|browser|multi-site|all] [unittest names...]" >&2; exit 2 ;;
esac
[ $# -gt 0 ] && modules=("$@")

step() { printf '[external] %s\n' "$*"; }
fail() { printf '[external] %s\n' "$*" >&2; echo "external: 0 passed, 1 failed"; exit 1; }

# ---------------------------------------------------------------- system packages
apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then fail "missing Debian packages ($*) and not root to install them"; fi
  if [ $apt_updated = 0 ]; then
    apt-get update -q >/tmp/external-apt.log 2>&1 || { tail -20 /tmp/external-apt.log >&2; fail "apt-get update failed"; }
    apt_updated=1
  fi
  step "installing $*"
  apt-get install -y -q --no-install-recommends "$@" >>/tmp/external-apt.log 2>&1 ||
    { tail -20 /tmp/external-apt.log >&2; fail "apt-get install $* failed"; }
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

if [ "$which" = multi-site ] || [ "$which" = all ]; then
  need=()
  for p in mosquitto openssl; do installed "$p" || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
  # Debian starts the packaged broker as a service where there is an init; the tests start
  # their own on free ports and need nothing else.
  step "$(mosquitto -h 2>/dev/null | head -1), $(openssl version)"
fi

if [ "$which" = browser ] || [ "$which" = all ]; then
  need=()
  for p in chromium chromium-driver fonts-dejavu-core; do installed "$p" || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
  export CHROMIUM=${CHROMIUM:-/usr/bin/chromium} CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
  [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ] || fail "no $CHROMIUM or $CHROMEDRIVER after installing"
  step "$("$CHROMEDRIVER" --version | head -1)"
fi

# ---------------------------------------------------------------- python venv with pymodbus
py=${PYTHON:-python3}
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
venv_ok() {
  "$venv/bin/python" - "$PYMODBUS_VERSION" "$PYSPARKPLUG_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version("pymodbus") != sys.argv[1] or version("pysparkplug") != sys.argv[2])
PY
}
if ! py_ok "$venv/bin/python" || ! venv_ok; then
  command -v "$py" >/dev/null && py_ok "$py" || py=/usr/bin/python3
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
    py=/usr/bin/python3
  fi
  py_ok "$py" || fail "$py is older than Python 3.11 (tomllib)"
  step "creating $venv with pymodbus==$PYMODBUS_VERSION pysparkplug==$PYSPARKPLUG_VERSION ($("$py" --version))"
  rm -rf "$venv"
  "$py" -m venv "$venv" || fail "python -m venv failed"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input "pymodbus==$PYMODBUS_VERSION" \
    "pysparkplug==$PYSPARKPLUG_VERSION" || fail "pip install pymodbus==$PYMODBUS_VERSION pysparkplug==$PYSPARKPLUG_VERSION failed"
fi
step "$("$venv/bin/python" --version), pymodbus $("$venv/bin/python" -c 'import pymodbus; print(pymodbus.__version__)')"

# ---------------------------------------------------------------- binaries
if [ -n "${AIRLOCK_BIN_DIR:-}" ]; then
  AIRLOCK_BIN_DIR=$(cd "$AIRLOCK_BIN_DIR" && pwd) || fail "no directory $AIRLOCK_BIN_DIR"
  export AIRLOCK_BIN_DIR
  step "using the binaries in $AIRLOCK_BIN_DIR"
else
  step "cargo build --workspace --bins"
  cargo build --workspace --bins ${CI:+--locked} || fail "cargo build failed"
  export AIRLOCK_BIN_DIR=$root/target/debug
fi
for b in airlockd airlock airlock-worker-field airlock-worker-logic airlock-worker-historian \
  airlock-worker-auth airlock-worker-ui airlock-worker-plcsim airlock-worker-bridge; do
  [ -x "$AIRLOCK_BIN_DIR/$b" ] || fail "no $AIRLOCK_BIN_DIR/$b"
done

# ---------------------------------------------------------------- tests
step "running ${modules[*]}"
start=$(date +%s)
set +e
cd "$here"
# A hard bound for the whole run; every wait inside a test is bounded far below it.
timeout --kill-after=30 900 "$venv/bin/python" - "${modules[@]}" <<'EOF'
import sys
import time
import unittest


class Timed(unittest.TextTestResult):
    """Records how long each test took (setUp and cleanups included)."""

    durations: list = []

    def startTest(self, test):
        self._started = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self.durations.append((time.monotonic() - self._started, test.id().split(".", 1)[1]))


suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[1:])
result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout, resultclass=Timed).run(suite)
for seconds, name in Timed.durations:
    print(f"{seconds:6.1f} s  {name}")
failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
skipped = len(result.skipped)
passed = result.testsRun - failed - skipped - len(result.expectedFailures)
print(f"external: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(0 if failed == 0 and passed > 0 else 1)
EOF
rc=$?
set -e
if [ $rc -ge 124 ]; then
  echo "[external] the test run was stopped after 900 s (exit $rc)"
  echo "external: 0 passed, 1 failed"
fi
step "took $(($(date +%s) - start)) s"
exit $rc
