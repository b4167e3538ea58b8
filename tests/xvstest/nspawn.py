"""A real systemd (Debian 12's) booted as PID 1 of a systemd-nspawn
container, in a network namespace a test made, so the xvs role's units run
under it as they do on a balancer: Type=notify, the watchdog, Restart=,
ExecStopPost=, ordering, .mount units, bird.service with its drop-in, and
`systemctl reboot`.  What it takes on these machines, and why, is in the
project's brief (shared/systemd-nspawn.md); the short of it:

- the root is this machine's own / as the lower layer of an overlay whose
  upper and work directories are on a tmpfs: nothing is written to the
  host, and /etc (the state of record, units, enablement) and the journal
  survive a reboot of the container, as on a disk;
- a fresh machine id, multi-user.target, and no services the image enables
  that a balancer does not run;
- nspawn in cgroups of our own (it makes its payload/ and supervisor/ ones
  beside its own), no registration with the host's (absent) systemd,
  bpf(2) allowed, every capability;
- everything under test runs through the container's systemd
  (systemd-run --wait --pipe), never entered with nsenter alone: that
  would escape nspawn's seccomp filter, and pass where a unit fails.

Every container is torn down on close(): nspawn killed, the overlay and
the tmpfs unmounted, the cgroups removed.
"""
import os
import shutil
import signal
import subprocess
import time

from xvstest.lab import wait_for

CGROUP_TREES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
REBOOT_STATUS = 133          # nspawn's exit status when the container asked for a reboot
# services the image enables that a balancer does not run, and what makes a boot slow
UNWANTED = ("multi-user.target.wants", "getty.target.wants", "timers.target.wants",
            "sysinit.target.wants")


class Container(object):
    """One container, named name, on the network namespace netns (made
    under /run/netns by the test), with the paths in binds mounted
    read-only at the same place inside."""

    def __init__(self, name, netns, binds=()):
        self.name, self.netns, self.binds = name, netns, list(binds)
        self.top = "/run/xvs-nspawn-%s" % name
        self.root = os.path.join(self.top, "root")
        self.proc = None
        self.console = os.path.join(self.top + "-console.log")
        self.boots = 0

    # ---- the root ----------------------------------------------------------------
    def prepare(self):
        os.makedirs(self.top, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "xvs-nspawn", self.top], check=True)
        for d in ("upper", "work", "root"):
            os.makedirs(os.path.join(self.top, d))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "lowerdir=/,upperdir=%s/upper,workdir=%s/work" % (self.top, self.top), self.root],
                       check=True)
        etc = os.path.join(self.root, "etc")
        machine_id = subprocess.run(["systemd-id128", "new"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        with open(os.path.join(etc, "machine-id"), "w") as f:
            f.write(machine_id + "\n")
        with open(os.path.join(etc, "hostname"), "w") as f:
            f.write(self.name + "\n")
        for wants in UNWANTED:
            shutil.rmtree(os.path.join(etc, "systemd", "system", wants), ignore_errors=True)
        target = os.path.join(etc, "systemd", "system", "default.target")
        if os.path.lexists(target):
            os.unlink(target)
        os.symlink("/lib/systemd/system/multi-user.target", target)
        for tree in CGROUP_TREES:
            os.makedirs(os.path.join(tree, self.name), exist_ok=True)

    def path(self, inside):
        """A path of the container's, from the host (its overlay)."""
        return os.path.join(self.root, inside.lstrip("/"))

    # ---- boot and reboot --------------------------------------------------------------
    def boot(self, timeout=60):
        """Start the container's systemd and wait until it has booted
        (systemctl is-system-running --wait: running or degraded)."""
        cmd = ["systemd-nspawn", "--quiet", "-D", self.root, "-M", self.name, "--boot", "--register=no",
               "--keep-unit", "--system-call-filter=bpf", "--capability=all",
               "--network-namespace-path=/run/netns/%s" % self.netns, "--link-journal=no",
               "--console=passive"] + ["--bind-ro=%s" % b for b in self.binds]
        name = self.name

        def own_cgroups():
            for tree in CGROUP_TREES:
                with open(os.path.join(tree, name, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        out = open(self.console, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=own_cgroups, start_new_session=True)
        out.close()
        self.boots += 1
        wait_for(lambda: self._leader() is not None, timeout=20, what="the container's PID 1")
        r = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.sh("systemctl is-system-running --wait", check=False, direct=True, timeout=timeout)
            if r.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise AssertionError("the container did not boot: %s\n%s" % (r and r.stdout, self.console_text()))

    def _leader(self):
        """The pid of the container's PID 1: nspawn's child."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                kids = f.read().split()
        except OSError:
            return None
        for pid in kids:
            try:
                with open("/proc/%s/comm" % pid) as f:
                    if f.read().strip() == "systemd":
                        return int(pid)
            except OSError:
                pass
        return None

    def reboot(self, remake_netns, timeout=60):
        """systemctl reboot inside; nspawn exits with 133; remake_netns()
        makes the balancer's namespace afresh (a new eth0, no XDP), as a
        power cycle would leave the links; boot again."""
        self.sh("systemctl reboot", check=False, direct=True)
        assert self.proc.wait(timeout=timeout) == REBOOT_STATUS, self.console_text()
        self.proc = None
        remake_netns()
        self.boot(timeout)

    def console_text(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    # ---- running things inside ----------------------------------------------------------
    def sh(self, cmd, check=True, timeout=300, direct=False, env=None):
        """Run a shell command in the container.  By default as a transient
        unit of its systemd (systemd-run --wait --pipe), so it runs as a
        unit does, under nspawn's seccomp filter; direct=True only enters
        the namespaces, for systemctl and journalctl themselves."""
        leader = self._leader()
        assert leader is not None, "the container is not running\n" + self.console_text()
        inner = ["/bin/sh", "-c", cmd]
        if not direct:
            setenv = ["--setenv=%s=%s" % kv for kv in sorted((env or {}).items())]
            inner = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
                     "--property=StandardInput=null"] + setenv + inner
        r = subprocess.run(["nsenter", "-t", str(leader), "-a"] + inner, capture_output=True, text=True,
                           timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError("in %s: %s: exit %d\n%s%s" % (self.name, cmd, r.returncode, r.stdout, r.stderr))
        return r

    def show(self, unit, *props):
        """{property: value} of a unit, from systemctl show."""
        r = self.sh("systemctl show %s -p %s" % (unit, ",".join(props)), direct=True)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit, extra=""):
        return self.sh("journalctl --no-pager -o short-monotonic -u %s %s" % (unit, extra), direct=True,
                       check=False).stdout

    # ---- teardown ---------------------------------------------------------------------------
    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        # nspawn's payload is in our cgroups: whatever outlived it goes too
        for tree in CGROUP_TREES:
            _kill_cgroup(os.path.join(tree, self.name))
        for mnt in (self.root, self.top):
            if os.path.ismount(mnt):
                subprocess.run(["umount", "-l", mnt], check=False)
        for path in (self.top, "/run/systemd/nspawn/propagate/%s" % self.name):
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.unlink(self.console)
        except OSError:
            pass


def _kill_cgroup(path):
    """Kill every process in the cgroup tree at path, then remove it, the
    deepest directories first."""
    if not os.path.isdir(path):
        return
    for dummy in range(50):
        pids = []
        for d, dummy2, dummy3 in os.walk(path):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    for d, dummy, dummy2 in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(d)
        except OSError:
            pass
