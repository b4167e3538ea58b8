"""The Molecule scenarios: molecule/default converges a balancer and three
real servers in namespaces, checks idempotence, simulates a reboot restored
by the units' commands, and verifies with real traffic; molecule/bgp rolls
out two balancers that announce the VIP over BGP to a router with ECMP."""
import glob
import os
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


@pytest.mark.parametrize("scenario,tag,scratch", [
    ("default", "xvsm", "/run/xvs-molecule"), ("bgp", "xvsb", "/run/xvs-molecule-bgp")])
def test_molecule_scenario(scenario, tag, scratch):
    shutil.rmtree(INSTALLED, ignore_errors=True)
    try:
        r = subprocess.run([os.path.join(BIN, "molecule"), "test", "-s", scenario], cwd=ROOT, env=tool_env(),
                           capture_output=True, text=True, timeout=1800, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        for step in ("converge", "idempotence", "side_effect", "verify"):
            assert "%s > %s: Executed: Successful" % (scenario, step) in out, out[-3000:]
    finally:
        shutil.rmtree(INSTALLED, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "xvstest", "lab.py"), "down",
                        tag, scratch], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        for name in glob.glob(os.path.join(_health.HEALTH_DIR, "*")):
            if _health.path_for(scratch).rsplit(".health", 1)[0] in name:    # the agents' health files
                os.unlink(name)
