#!/usr/bin/env bash
# The Debian package under a real systemd as PID 1: boots a throw-away Debian machine with
# ../shared/run-systemd (rootful, so that PrivateNetwork=, IPAddressDeny= and the BPF firewall
# really apply), installs DEB there and runs tests/packaging/systemd_checks.py inside it (both
# modes, switching, watchdog, socket activation, reinstall and upgrade in each mode, purge).
#
#   tests/packaging/test_systemd.sh DEB [LOWER_DEB]            (as root)
#
# LOWER_DEB is the package an upgrade starts from; without it, one is built from the same
# tree with a lower version (build-deb.sh --no-build --version VERSION~lane: target/release
# must hold the release build DEB came from). The shared directory is $AIRLOCK_SHARED, else
# ../shared beside the repository; `run-systemd --setup` must have run (.ci/run does it).
# Prints the checks and a closing `systemd: N passed, M failed`; exits non-zero on a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
shared=${AIRLOCK_SHARED:-$(cd "$here/.." && pwd)/shared}
# Mosquitto in the machine: the "remote" broker of the bridge's drop-in check (docs/multi-site.md).
# .ci/run sets the machine up with the same list (one rootfs per list).
RUN_SYSTEMD_PACKAGES=${RUN_SYSTEMD_PACKAGES:-mosquitto,mosquitto-clients}
[ $# -ge 1 ] && [ -f "$1" ] || { echo "usage: $0 DEB [LOWER_DEB]" >&2; exit 2; }
deb=$(readlink -f "$1")
fail() { echo "FAIL $*"; echo "systemd: 0 passed, 1 failed"; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root: run-systemd needs a rootful container"
[ -x "$shared/run-systemd" ] || fail "no $shared/run-systemd"

if [ $# -ge 2 ]; then
  lower=$(readlink -f "$2")
else
  version=$(dpkg-deb -f "$deb" Version)
  lower=$("$here/packaging/debian/build-deb.sh" --no-build --version "$version~lane" 2>/tmp/build-deb-lower.log | tail -n1)
  [ -f "$lower" ] || { tail -n 20 /tmp/build-deb-lower.log; fail "building the lower-version package failed"; }
  lower=$(readlink -f "$lower")
fi
dpkg --compare-versions "$(dpkg-deb -f "$lower" Version)" lt "$(dpkg-deb -f "$deb" Version)" ||
  fail "$lower is not a lower version than $deb"
echo "package $(dpkg-deb -f "$deb" Version), upgrade from $(dpkg-deb -f "$lower" Version)"

# Ten minutes for the whole lane (boot, install, checks, cleanup).
start=$SECONDS
RUN_SYSTEMD_PACKAGES=$RUN_SYSTEMD_PACKAGES RUN_SYSTEMD_TIMEOUT=${RUN_SYSTEMD_TIMEOUT:-600} RUN_SYSTEMD_ENV="${AIRLOCK_USER_ADD:+AIRLOCK_USER_ADD}" \
  "$shared/run-systemd" --deb "$deb" \
  --copy "$deb:/run/airlock-lane/current.deb" --copy "$lower:/run/airlock-lane/lower.deb" \
  --copy "$here/tests/packaging/systemd_checks.py:/run/airlock-lane/systemd_checks.py" \
  --copy "$here/docs/deployment.md:/run/airlock-lane/deployment.md" \
  --copy "$here/docs/multi-site.md:/run/airlock-lane/multi-site.md" \
  -- python3 /run/airlock-lane/systemd_checks.py
rc=$?
echo "systemd lane: exit $rc after $((SECONDS - start)) s"
# 124/125: run-systemd timed out or could not set the machine up; the checks printed no totals.
[ $rc = 124 ] || [ $rc = 125 ] && fail "run-systemd exited $rc (timeout or setup)"
exit $rc
