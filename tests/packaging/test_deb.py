#!/usr/bin/env python3
"""Installs the Debian package on this machine, runs airlockd the way airlockd.service and
airlockd.socket would (user airlock, systemd's environment, the HMI socket passed by
socket activation, NOTIFY_SOCKET read here, and the unit's SystemCallFilter= built the way
systemd builds it), checks READY=1 and the HMI; then the same for
airlockd-privileged.service (root, its capability bounding set, its filter); then purges the
package and checks that nothing is left but what Debian policy keeps (the system user).

The filters are built with libseccomp (python3-seccomp) from `systemd-analyze
syscall-filter`'s groups, so a unit whose filter refuses what confining the workers takes
fails here, not on the first real host.

Usage (as root): /usr/bin/python3 tests/packaging/test_deb.py PATH/TO/airlock_VERSION_ARCH.deb
"""
import atexit
import ctypes
import errno
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import seccomp
except ImportError:
    sys.exit("test_deb.py needs python3-seccomp (apt-get install python3-seccomp) and Debian's python3")

FAILED = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)
    return ok


def run(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def syscall_group(name, cache={}):
    """The syscalls of a systemd group (@name), expanded as systemd-analyze lists them."""
    if name not in cache:
        out = run("systemd-analyze", "syscall-filter", name).stdout
        names = set()
        for line in out.splitlines():
            item = line.strip()
            if not item or item.startswith("#") or item == name:
                continue
            names |= syscall_group(item) if item.startswith("@") else {item}
        if not names:
            sys.exit(f"systemd-analyze syscall-filter {name} listed nothing (is systemd installed?)")
        cache[name] = names
    return cache[name]


def unit_syscall_filter(unit):
    """The unit's SystemCallFilter= lines as systemd applies them: the first allow list, then
    each ~list removed from it and each further list added; EPERM for everything else
    (SystemCallErrorNumber=EPERM). systemd also always allows execve, exit, exit_group,
    getrlimit, rt_sigreturn and sigreturn."""
    allowed = None
    for line in open(unit):
        line = line.strip()
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        names = set()
        for item in value.lstrip("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        if allowed is None:
            allowed = set()
        allowed = allowed - names if value.startswith("~") else allowed | names
    if allowed is None:
        sys.exit(f"{unit} has no SystemCallFilter=")
    allowed |= {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a syscall of this architecture
    f.set_attr(seccomp.Attr.CTL_NNP, 1)
    return f


def unit_capabilities(unit):
    """CapabilityBoundingSet= as capability numbers (capability.h order)."""
    names = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
             "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
             "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
             "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease",
             "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
             "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]
    for line in open(unit):
        if line.startswith("CapabilityBoundingSet="):
            return {names.index(c.lower().removeprefix("cap_")) for c in line.split("=", 1)[1].split()}
    return set(range(len(names)))


def main():
    if os.geteuid() != 0:
        sys.exit("test_deb.py must run as root (it installs a package)")
    deb = os.path.abspath(sys.argv[1])
    run("dpkg", "--purge", "airlock")
    # State a source build run as root left here is not the package's: keep it aside.
    aside = None
    if os.path.exists("/var/lib/airlock"):
        aside = f"/var/lib/airlock.before-test-{os.getpid()}"
        os.rename("/var/lib/airlock", aside)
    try:
        installed(deb)
    finally:
        if aside:
            subprocess.run(["rm", "-rf", "/var/lib/airlock"])
            os.rename(aside, "/var/lib/airlock")


def installed(deb):
    r = run("apt-get", "install", "-y", "-q", "--no-install-recommends", deb, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not check(r.returncode == 0, "the package installs"):
        print(r.stdout[-3000:], r.stderr[-3000:])
        return
    files = [l for l in run("dpkg", "-L", "airlock").stdout.splitlines() if l.strip()]
    for path in ["/usr/bin/airlockd", "/usr/bin/airlock", "/usr/libexec/airlock/airlock-worker-ui",
                 "/usr/share/airlock/policies/ui.toml", "/etc/airlock/airlock.toml",
                 "/usr/lib/systemd/system/airlockd.service", "/usr/lib/sysusers.d/airlock.conf",
                 "/usr/lib/tmpfiles.d/airlock.conf", "/usr/share/man/man8/airlockd.8.gz",
                 "/usr/share/man/man8/airlock-hmi-user.8.gz", "/usr/bin/airlock-hmi", "/usr/share/doc/airlock/copyright"]:
        check(path in files and os.path.exists(path), f"installed {path}")
    # The test workers (the escape probe can play a lying worker) are never shipped.
    for w in ["probe", "echo", "sink"]:
        check(not any(f.endswith(f"airlock-worker-{w}") for f in files), f"airlock-worker-{w} is not in the package")
    conff = run("dpkg-query", "-W", "-f=${Conffiles}", "airlock").stdout
    check("/etc/airlock/airlock.toml" in conff, "/etc/airlock/airlock.toml is a conffile")
    try:
        pw = pwd.getpwnam("airlock")
    except KeyError:
        check(False, "the airlock system user exists")
        return
    check(pw.pw_uid < 1000, f"airlock is a system user (uid {pw.pw_uid})")
    st = os.stat("/var/lib/airlock")
    check(st.st_uid == pw.pw_uid and (st.st_mode & 0o777) == 0o700, "/var/lib/airlock is airlock's, mode 0700 (tmpfiles.d)")
    r = run("airlockd", "--check-config", "/etc/airlock/airlock.toml")
    check(r.returncode == 0, f"airlockd --check-config /etc/airlock/airlock.toml: {r.stdout.strip()} {r.stderr.strip()}")
    r = run("man", "-l", "/usr/share/man/man8/airlockd.8.gz", env=dict(os.environ, MANPAGER="cat", MANWIDTH="80"))
    if r.returncode == 0:
        check("--check-config" in r.stdout, "man airlockd documents --check-config")

    start_like_the_unit(pw, "airlockd.service")
    start_like_the_unit(pw, "airlockd-privileged.service")

    r = run("dpkg", "--purge", "airlock")
    check(r.returncode == 0, "the package purges")
    left = [f for f in files if f not in ("/.",) and os.path.lexists(f) and not os.path.isdir(f)]
    check(not left, f"no installed file is left after purge: {left[:5]}")
    for d in ["/etc/airlock", "/var/lib/airlock", "/run/airlock", "/usr/libexec/airlock", "/usr/share/airlock",
              "/usr/share/doc/airlock"]:
        check(not os.path.exists(d), f"{d} is gone after purge")
    check(run("getent", "passwd", "airlock").returncode == 0,
          "the airlock system user stays after purge (Debian policy: users are not removed)")


def emulate_delegation(unit_text):
    """Delegate=yes as systemd gives it on a host with cgroup v1 controllers: a cgroup of the
    service's own in the memory, pids and cpu hierarchies, owned by root, for airlockd to create
    its workers' cgroups in (the privileged unit's bounding set has no CAP_DAC_OVERRIDE, so it
    cannot write where the test runs). Returns the directories, or None where this host gives
    no v1 controllers (a cgroup v2 host, where only a real systemd delegates)."""
    if "Delegate=yes" not in unit_text or os.geteuid() != 0:
        return None
    mounts = {}
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        l, r = left.split(), right.split()
        if len(r) >= 3 and r[0] == "cgroup":
            for c in r[2].split(","):
                mounts[c] = (l[4], l[3])
    own = {}
    for line in open("/proc/self/cgroup"):
        _, ctl, path = line.rstrip("\n").split(":", 2)
        for c in ctl.split(","):
            own[c] = path
    dirs = []
    for c in ("memory", "pids", "cpu"):
        if c not in mounts or c not in own:
            return None
        point, root = mounts[c]
        path = own[c]
        rel = path[len(root.rstrip("/")):] if root != "/" else path
        d = os.path.join(point, rel.lstrip("/"), f"airlock-test-deb-{os.getpid()}")
        try:
            os.makedirs(d, exist_ok=True)
        except OSError:
            return None
        dirs.append(d)
    return dirs


def remove_delegated(dirs):
    for d in dirs or []:
        for _ in range(100):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def start_like_the_unit(pw, unit_name):
    unit = f"/usr/lib/systemd/system/{unit_name}"
    privileged = "User=airlock" not in open(unit).read()
    print(f"--- {unit_name}: {'root with its bounding set' if privileged else 'user airlock'}, its syscall filter", flush=True)
    syscalls = unit_syscall_filter(unit)
    keep_caps = unit_capabilities(unit)
    owner = (0, 0) if privileged else (pw.pw_uid, pw.pw_gid)
    tmp = tempfile.mkdtemp(prefix="airlock-deb-")
    os.chmod(tmp, 0o755)
    notify_path = os.path.join(tmp, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    os.chmod(notify_path, 0o777)
    notify.settimeout(1.0)
    # RuntimeDirectory= as systemd makes it; StateDirectory= chowned (recursively) to the
    # service's user, as systemd does when a service switches between the two modes.
    os.makedirs("/run/airlock", exist_ok=True)
    os.chown("/run/airlock", *owner)
    os.chmod("/run/airlock", 0o750)
    for root, dirs, files in os.walk("/var/lib/airlock"):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), *owner)
    os.chown("/var/lib/airlock", *owner)
    # airlockd.socket: ListenStream=127.0.0.1:8080, FileDescriptorName=hmi.
    hmi = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hmi.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hmi.bind(("127.0.0.1", 8080))
    hmi.listen(128)
    # The unit's own command line, as systemd would run it.
    # (shlex for quoting; systemd's prefixes such as '-' or '+' would change how it runs, and
    # this unit has none.)
    exec_start = next(line.split("=", 1)[1] for line in open(unit) if line.startswith("ExecStart="))
    check(exec_start[:1] not in "-+!@:", f"{unit_name}: ExecStart= has no special prefix: {exec_start}")
    argv = shlex.split(exec_start)
    delegated = emulate_delegation(open(unit).read()) if privileged else None
    if privileged and delegated is None:
        # Only a real systemd delegates on this host (the systemd lane tests that): here the
        # cgroup layer is taken as best-effort, and said so.
        print("no cgroup v1 controllers to delegate here: cgroup taken as best-effort", flush=True)
        argv += ["--best-effort", "cgroup"]
    if delegated:
        atexit.register(remove_delegated, delegated)
    log_path = os.path.join(tmp, "airlockd.log")
    log = open(log_path, "wb")
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.dup2(hmi.fileno(), 3)
            os.set_inheritable(3, True)
            os.closerange(4, 1024)
            for d in delegated or []:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            if privileged:
                libc = ctypes.CDLL(None, use_errno=True)
                for cap in range(64):
                    if cap not in keep_caps:
                        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last one)
            else:
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
            os.umask(0o077)
            syscalls.load()
            env = {
                "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/var/lib/airlock",
                "USER": "root" if privileged else "airlock",
                "STATE_DIRECTORY": "/var/lib/airlock", "RUNTIME_DIRECTORY": "/run/airlock",
                "CONFIGURATION_DIRECTORY": "/etc/airlock", "NOTIFY_SOCKET": notify_path,
                "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
                "LISTEN_FDS": "1", "LISTEN_FDNAMES": "hmi", "LISTEN_PID": str(os.getpid()),
            }
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    hmi.close()
    got = []

    def exercise():
        deadline = time.time() + 60
        while time.time() < deadline and not any("READY=1" in m for m in got):
            try:
                got.append(notify.recv(4096).decode(errors="replace"))
            except socket.timeout:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
        if not check(any("READY=1" in m for m in got), "READY=1 arrives on NOTIFY_SOCKET"):
            print(open(log_path, errors="replace").read()[-4000:])
        ok_page = False
        for _ in range(50):
            try:
                with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=2) as r:
                    body = r.read().decode(errors="replace")
                    ok_page = r.status == 200 and "<html" in body.lower()
                    break
            except Exception:
                time.sleep(0.2)
        check(ok_page, "the HMI answers on 127.0.0.1:8080")
        # Workers start in parallel, off airlockd's event loop: the page can be up while another
        # layer is still starting.
        for _ in range(100):
            r = run("airlock", "status", "--json", "--socket", "/run/airlock/control.sock")
            if r.returncode != 0 or '"Starting"' not in r.stdout:
                break
            time.sleep(0.2)
        if check(r.returncode == 0, "airlock status answers (root over SO_PEERCRED)"):
            st = json.loads(r.stdout)
            states = {w["name"]: w["state"] for w in st["workers"]}
            if not check(all(s == "Running" or s == "running" or (isinstance(s, dict) and "Running" in s) for s in states.values()),
                         f"every worker runs: {states}"):
                print(open(log_path, errors="replace").read()[-4000:])
            check(st["uid"] == owner[0], f"airlockd runs as uid {owner[0]}")
            # The packaged configuration requires every layer; only what the unit's command
            # line downgrades (--best-effort) may be missing, and it must be reported.
            relaxed = set()
            for i, a in enumerate(argv):
                if a == "--best-effort" and i + 1 < len(argv):
                    relaxed |= set(argv[i + 1].split(","))
                elif a.startswith("--best-effort="):
                    relaxed |= set(a.split("=", 1)[1].split(","))
            for w in st["workers"]:
                missing = {l["layer"]: l for l in w["confinement"] if l["state"] != "applied" and l["layer"] not in relaxed}
                check(not missing, f"{w['name']}: every layer the unit requires is applied ({missing})")
            check(privileged or relaxed == {"uid", "mount-namespace", "cgroup"}, f"the unprivileged unit relaxes uid, mount-namespace and cgroup only: {relaxed}")
            if privileged:
                def host_uid(pid):
                    if pid is None:
                        return None
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("Uid:"):
                            return int(line.split()[1])
                uids = {w["name"]: host_uid(w["pid"]) for w in st["workers"]}
                check(len(set(uids.values())) == len(uids), f"every worker has its own uid: {uids}")
        # auth creates the operator right after it starts serving: READY=1 may come first.
        deadline = time.time() + 15
        while True:
            log_text = open(log_path, errors="replace").read()
            if 'created operator "operator" with password' in log_text or time.time() > deadline:
                break
            time.sleep(0.2)
        if not privileged:
            check(log_text.count('created operator "operator" with password') == 1, "the first operator's password is in the log once")
        else:
            check('created operator' not in log_text, "the operator created in the other mode is kept (state directory handed over)")

    # Whatever fails above, airlockd is stopped below (a later mode needs the port).
    try:
        exercise()
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        check(False, f"{unit_name}: {type(e).__name__}: {e}")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    status = None
    try:
        for _ in range(100):
            p, status = os.waitpid(pid, os.WNOHANG)
            if p:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # reaped while waiting for READY=1: airlockd had exited (status stays None)
    check(status == 0, f"airlockd stops cleanly on SIGTERM (status {status})")
    try:
        while True:
            got.append(notify.recv(4096).decode(errors="replace"))
    except (socket.timeout, OSError):
        pass
    check(any("STOPPING=1" in m for m in got), "STOPPING=1 arrives")


if __name__ == "__main__":
    main()
    print(f"packaging: {len(FAILED)} failed" if FAILED else "packaging: all checks passed")
    sys.exit(1 if FAILED else 0)
