"""Network namespaces for tests: created, used and always torn down.

Only documentation ranges are used, only inside the namespaces made here.
"""
import contextlib
import os
import signal
import subprocess
import time

from pyroute2 import netns as _netns


class Lab(object):
    def __init__(self, tag):
        # interface names are limited to 15 characters: keep the tag short
        self.tag = "%s%d" % (tag, os.getpid() % 100000)
        self.namespaces = []
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def name(self, short):
        return "%s-%s" % (self.tag, short)

    def add(self, short):
        ns = self.name(short)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        self.sh(ns, "ip link set lo up")
        return ns

    def sh(self, ns, cmd, check=True, **kw):
        return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], check=check,
                              capture_output=True, text=True, **kw)

    def veth(self, ns1, if1, ns2, if2):
        subprocess.run(["ip", "link", "add", if1, "netns", ns1, "type", "veth",
                        "peer", "name", if2, "netns", ns2], check=True)
        self.sh(ns1, "ip link set %s up" % if1)
        self.sh(ns2, "ip link set %s up" % if2)

    def bg(self, ns, cmd):
        p = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", "exec " + cmd],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        self.namespaces = []


@contextlib.contextmanager
def inside(ns):
    """Run this process's netlink and bpf calls in ns for the block."""
    _netns.pushns(ns)
    try:
        yield
    finally:
        _netns.popns()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
