#!/usr/bin/env bash
# Builds the container image offline and runs it with rootless podman, as an administrator
# would: a Debian minbase rootfs made by debootstrap (the one ../shared/run-unprivileged
# builds and caches) imported with `podman import` as the base, plus the locally built
# package; then `podman run` without --privileged or added capabilities, and checks that the
# HMI answers on the published port and that the confinement report is truthful (every
# worker's Seccomp/NoNewPrivs/capabilities in its /proc status match what it reports).
#
#   tests/packaging/test_container.sh PATH/TO/airlock_VERSION_ARCH.deb      (as root)
set -uo pipefail
deb=$(readlink -f "$1")
here=$(cd "$(dirname "$0")/../.." && pwd)
shared=${AIRLOCK_SHARED:-$(cd "$here/.." && pwd)/shared}
runner=$shared/run-unprivileged
fails=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }

[ "$(id -u)" = 0 ] || { echo "run as root (the podman user is created and driven from root)"; exit 2; }
"$runner" --setup >/dev/null 2>&1 || { echo "run-unprivileged --setup failed"; exit 1; }
cache=${RUN_UNPRIVILEGED_CACHE:-/var/cache/run-unprivileged}
suite=$(. /etc/os-release; echo "${VERSION_CODENAME:-bookworm}")
base=$cache/base-$suite
user=${RUN_UNPRIVILEGED_USER:-rununpriv}
uid=$(id -u "$user"); gid=$(id -g "$user"); home=$(getent passwd "$user" | cut -d: -f6)
[ -f "$base.ok" ] || { echo "no debootstrap rootfs at $base"; exit 1; }
as_user() {
  setpriv --reuid="$uid" --regid="$gid" --init-groups env -C / HOME="$home" USER="$user" LOGNAME="$user" \
    XDG_RUNTIME_DIR="$cache/xdg-$uid" CONTAINERS_CONF="$cache/containers.conf" "$@"
}

ctx=$(mktemp -d /tmp/airlock-image.XXXXXX)
cp "$here/packaging/container/Containerfile" "$ctx/Containerfile"
cp "$deb" "$ctx/airlock.deb"
chown -R "$uid:$gid" "$ctx"
name=airlock-test-$$
cleanup() {
  as_user podman rm -f "$name" >/dev/null 2>&1
  as_user podman rmi -f localhost/airlock:test >/dev/null 2>&1
  rm -rf "$ctx"
}
trap cleanup EXIT

echo "importing the minbase rootfs ($base)"
tar -C "$base" --numeric-owner --exclude='./dev/*' -cf - . |
  as_user podman import - "localhost/debian-minbase:$suite" >/dev/null || { echo "podman import failed"; exit 1; }
echo "building the image"
if as_user podman build --network=none --build-arg "BASE=localhost/debian-minbase:$suite" \
     -t localhost/airlock:test -f "$ctx/Containerfile" "$ctx" >"$ctx/build.log" 2>&1; then
  ok "image builds offline from the imported rootfs and the package"
else
  bad "image build"; tail -40 "$ctx/build.log"; exit 1
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
published=1
if as_user podman run -d --name "$name" -p "127.0.0.1:$port:8080" localhost/airlock:test >/dev/null 2>"$ctx/run.log"; then
  ok "podman run -p 127.0.0.1:$port:8080, without --privileged or added capabilities"
elif grep -q '/dev/net/tun' "$ctx/run.log"; then
  # This host forbids the user-mode network stack (no /dev/net/tun for slirp4netns): run
  # without a network and reach the HMI from inside the container's own namespace.
  published=0
  echo "note: publishing ports needs /dev/net/tun, which this host denies; checking the HMI from inside the container"
  as_user podman rm -f "$name" >/dev/null 2>&1
  if as_user podman run -d --name "$name" --network none localhost/airlock:test >/dev/null 2>"$ctx/run.log"; then
    ok "podman run --network none, without --privileged or added capabilities"
  else
    bad "podman run"; cat "$ctx/run.log"; exit 1
  fi
else
  bad "podman run"; cat "$ctx/run.log"; exit 1
fi

answered=0
for _ in $(seq 1 100); do
  if [ $published = 1 ]; then
    if python3 - "$port" <<'PY' 2>/dev/null; then answered=1; break; fi
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2) as r:
    body = r.read().decode(errors="replace")
    sys.exit(0 if r.status == 200 and "<html" in body.lower() else 1)
PY
  else
    page=$(as_user podman exec "$name" bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3 && timeout 5 cat <&3' 2>/dev/null)
    if grep -q '^HTTP/1.1 200' <<<"$page" && grep -qi '<html' <<<"$page"; then answered=1; break; fi
  fi
  sleep 0.3
done
[ $answered = 1 ] && ok "the HMI answers on port 8080 of the container" || bad "the HMI does not answer"

# Workers start in parallel, off airlockd's event loop: wait until none is still starting.
for _ in $(seq 50); do
  status=$(as_user podman exec "$name" airlock status --json 2>&1)
  grep -q '"Starting"' <<<"$status" || break
  sleep 0.2
done
if python3 - "$status" <<'PY'; then ok "every worker runs, as the non-root airlock user"; else bad "workers: $status"; fi
import json, sys
st = json.loads(sys.argv[1])
assert st["uid"] != 0, "airlockd runs as root"
assert len(st["workers"]) == 6, st["workers"]
assert all(w["state"] == "Running" for w in st["workers"]), [(w["name"], w["state"]) for w in st["workers"]]
PY

# The report against the kernel's view, worker by worker.
truthful=1
while read -r wname pid seccomp nnp; do
  proc=$(as_user podman exec "$name" cat "/proc/$pid/status" 2>/dev/null) || { truthful=0; echo "no /proc/$pid"; continue; }
  got_sec=$(sed -n 's/^Seccomp:\s*//p' <<<"$proc"); got_nnp=$(sed -n 's/^NoNewPrivs:\s*//p' <<<"$proc")
  got_capeff=$(sed -n 's/^CapEff:\s*//p' <<<"$proc")
  want_sec=0; [ "$seccomp" = applied ] && want_sec=2
  want_nnp=0; [ "$nnp" = applied ] && want_nnp=1
  if [ "$got_sec" != "$want_sec" ] || [ "$got_nnp" != "$want_nnp" ] || [ "$got_capeff" != 0000000000000000 ]; then
    truthful=0; echo "$wname: report seccomp=$seccomp no-new-privs=$nnp, kernel Seccomp=$got_sec NoNewPrivs=$got_nnp CapEff=$got_capeff"
  fi
done < <(python3 - "$status" <<'PY'
import json, sys
for w in json.loads(sys.argv[1])["workers"]:
    c = {l["layer"]: l["state"] for l in w["confinement"]}
    print(w["name"], w["pid"], c.get("seccomp", "?"), c.get("no-new-privs", "?"))
PY
)
[ $truthful = 1 ] && ok "the confinement report matches every worker's /proc status" || bad "the confinement report is not truthful"

as_user podman exec "$name" airlock status | sed -n '1,25p'
logs=$(as_user podman logs "$name" 2>&1)
grep -q 'created operator "operator" with password' <<<"$logs" && ok "the first operator's password is in podman logs" ||
  bad "no operator password in the logs"
as_user podman stop -t 10 "$name" >/dev/null 2>&1
code=$(as_user podman inspect -f '{{.State.ExitCode}}' "$name" 2>/dev/null)
[ "$code" = 0 ] && ok "airlockd stops cleanly on podman stop" || bad "exit code after podman stop: $code"

echo "container: $fails failed"
[ $fails = 0 ]
