"""Hitless changes under load.

In the namespace lab, long-lived TCP connections are held open through the
VIP and a steady stream of new connections runs, while the program is
reloaded (a new build via xvs_attach) and destinations are added,
re-weighted, drained and removed.  Counted:

* established connections broken: 0, except those to the removed backend;
* new connections failed: 0;
* new connections sent to a drained (or removed) backend once the module
  that drained it has returned: 0.
"""
import os
import threading
import time

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _loader
from xvstest.lab import ECHO_PORT, VIP, dsr_lab, echo_connect, inside
from xvstest.modules import Modules

BACKENDS = {"b1": "192.0.2.21", "b2": "192.0.2.22", "b3": "192.0.2.23", "b4": "192.0.2.24"}
SIZES = {"flow_table_size": 65536, "max_services": 8}
HELD = 24


def echo(conn, line):
    try:
        conn[0].sendall(line)
        return conn[1].readline() == line
    except OSError:
        return False


class Stream(threading.Thread):
    """New connections one after another: each connects, is greeted,
    echoes a line and closes.  Records (start time, backend or None)."""

    def __init__(self, ns):
        super().__init__(daemon=True)
        self.ns, self.results, self.stop = ns, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                c = echo_connect(self.ns, timeout=3)
                ok = echo(c, b"new\n")
                c[0].close()
                self.results.append((start, c[2] if ok and c[2] else None))
            except OSError:
                self.results.append((start, None))
            time.sleep(0.01)


@pytest.fixture
def lab(tmp_path):
    with dsr_lab("xh", tmp_path, BACKENDS) as lab:
        yield lab


def test_reload_and_destination_changes_under_load(lab, bpffs):
    root = os.path.join(bpffs, "hitless")
    mods = Modules(lab.name("bal"), root)
    dest = {"service_address": VIP, "service_port": ECHO_PORT}
    held, stream = [], Stream(lab.name("cli"))
    marks = {}

    def module(name, args):
        rc, result = mods.call(name, args)
        assert rc == 0 and result.get("changed"), (name, args, result)

    try:
        module("xvs_attach", {"interfaces": ["eth0"], "sizes": SIZES})
        module("xvs_service", {"address": VIP, "port": ECHO_PORT, "destinations": [
            {"address": BACKENDS[b]} for b in ("b1", "b2", "b3")]})
        held = [echo_connect(lab.name("cli"), timeout=3) for dummy in range(HELD)]
        assert {c[2] for c in held} == {"b1", "b2", "b3"}, [c[2] for c in held]
        stream.start()
        time.sleep(1)

        # a new build of the program, loaded and swapped in under load
        module("xvs_attach", {"interfaces": ["eth0"], "sizes": dict(SIZES, tcp_timeout=900)})
        time.sleep(1)
        module("xvs_destination", dict(dest, address=BACKENDS["b4"]))
        time.sleep(1)
        module("xvs_destination", dict(dest, address=BACKENDS["b2"], weight=3))
        time.sleep(1)
        module("xvs_destination", dict(dest, address=BACKENDS["b1"], weight=0))
        marks["drained"] = time.monotonic()
        time.sleep(2)
        module("xvs_destination", dict(dest, address=BACKENDS["b3"], state="absent"))
        marks["removed"] = time.monotonic()
        time.sleep(2)
        stream.stop.set()
        stream.join(timeout=10)

        survived = {c[2]: 0 for c in held}
        broken = {c[2]: 0 for c in held}
        for c in held:
            if echo(c, b"still there?\n"):
                survived[c[2]] += 1
            else:
                broken[c[2]] += 1
        new = stream.results
        failed = [r for r in new if r[1] is None]
        to_drained = [r for r in new if r[1] == "b1" and r[0] > marks["drained"]]
        to_removed = [r for r in new if r[1] == "b3" and r[0] > marks["removed"]]
        print("held %d connections: broken %s, survived %s; new connections %d, failed %d, to the "
              "drained backend %d, to the removed one %d"
              % (len(held), broken, survived, len(new), len(failed), len(to_drained), len(to_removed)))
        assert sum(n for b, n in broken.items() if b != "b3") == 0, broken
        assert failed == [], failed
        assert to_drained == [] and to_removed == []
        assert len(new) > 50
        assert {r[1] for r in new if r[0] > marks["removed"]} <= {"b2", "b4"}
        assert "b4" in {r[1] for r in new}
    finally:
        stream.stop.set()
        for c in held:
            c[0].close()
        mods.close()
        with inside(lab.name("bal")):
            _loader.detach("eth0")
        _loader.unpin_all(root)
