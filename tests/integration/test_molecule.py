"""The Molecule scenarios: molecule/default converges a balancer and three
real servers in namespaces, checks idempotence, simulates a reboot restored
by the units' commands, and verifies with real traffic; molecule/bgp rolls
out two balancers that announce the VIP over BGP to a router with ECMP.
Both run the roles in check mode before they converge and after."""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from ansible_collections.xvs import lb
from ansible_collections.xvs.lb.plugins.module_utils import _health

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
# Molecule (through ansible-compat) installs the collection under test here;
# a copy left behind would shadow the working tree in later runs.
INSTALLED = os.path.expanduser("~/.ansible/collections/ansible_collections/xvs/lb")


def tool_env():
    coll = os.path.dirname(os.path.dirname(os.path.dirname(lb.__path__[0])))
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
                ANSIBLE_COLLECTIONS_PATH=coll, NO_COLOR="1", ANSIBLE_FORCE_COLOR="0")


def fingerprint(tag, scratch):
    """What a run could change on the lab's hosts: every regular file under
    the scratch directory (their /etc stand-ins, units, libraries), and in
    each namespace the global addresses (the VIPs), which links run XDP, and
    the ARP sysctls (what the kernel changes by itself meanwhile, bridge
    timers and link-local addresses, left out)."""
    files = {}
    for d, dirs, names in os.walk(scratch):
        for sub in [x for x in dirs if os.path.ismount(os.path.join(d, x))]:    # a bpffs: its pins
            dirs.remove(sub)
            files[os.path.join(d, sub)] = sorted(os.listdir(os.path.join(d, sub)))
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    hosts = {}
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split():
        if ns.startswith(tag + "-"):
            hosts[ns] = subprocess.run(
                ["ip", "netns", "exec", ns, "sh", "-c", "ip -o addr show scope global | awk '{print $2, $3, $4}'; "
                 "ip -o link | awk '{print $2, /xdp/}'; "
                 "sysctl net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce"],
                capture_output=True, text=True, check=False).stdout
    return files, hosts


def changes(before, after):
    """What differs between two fingerprints, for the failure message."""
    import difflib
    out = ["file %s" % k for k in sorted(set(before[0]) | set(after[0])) if before[0].get(k) != after[0].get(k)]
    for ns in sorted(set(before[1]) | set(after[1])):
        out += ["%s: %s" % (ns, line) for line in difflib.unified_diff(
            before[1].get(ns, "").splitlines(), after[1].get(ns, "").splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return "\n".join(out)


def recap(out):
    """{host: changed} of a molecule step's PLAY RECAP (the last one)."""
    block = out[out.rindex("PLAY RECAP"):]
    return dict((h, int(n)) for h, n in re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", block, re.M))


@pytest.mark.parametrize("scenario,tag,scratch", [
    ("default", "xvsm", "/run/xvs-molecule"), ("bgp", "xvsb", "/run/xvs-molecule-bgp")])
def test_molecule_scenario(scenario, tag, scratch):
    """The scenario's test sequence, step by step: check mode on a fresh
    lab predicts on every host the changes the roles then make (the same
    count) and changes nothing; after the roles, check mode predicts none."""
    shutil.rmtree(INSTALLED, ignore_errors=True)

    def step(name):
        r = subprocess.run([os.path.join(BIN, "molecule"), name.replace("_", "-"), "-s", scenario], cwd=ROOT,
                           env=tool_env(),
                           capture_output=True, text=True, timeout=1800, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and re.search(r"%s > %s\]?:? Executed: Successful" % (scenario, name), out), \
            out[-6000:]
        return out
    try:
        step("destroy")
        step("create")
        before = fingerprint(tag, scratch)
        predicted = recap(step("check"))
        after = fingerprint(tag, scratch)
        assert before == after, "check mode changed the lab: %s" % changes(before, after)
        assert predicted and all(n > 0 for n in predicted.values()), predicted
        assert recap(step("converge")) == predicted        # task by task, the run makes what check mode said
        step("idempotence")
        assert set(recap(step("check")).values()) == {0}
        for name in ("side_effect", "verify"):
            step(name)
    finally:
        shutil.rmtree(INSTALLED, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "xvstest", "lab.py"), "down",
                        tag, scratch], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        for name in glob.glob(os.path.join(_health.HEALTH_DIR, "*")):
            if _health.path_for(scratch).rsplit(".health", 1)[0] in name:    # the agents' health files
                os.unlink(name)
