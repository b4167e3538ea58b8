"""The Molecule fleet scenario (molecule/default): converge a balancer and
three real servers in namespaces, idempotence, a simulated reboot restored
by the units' commands, and verification with real traffic."""
import os
import shutil
import subprocess
import sys

from ansible_collections.xvs import lb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
# Molecule (through ansible-compat) installs the collection under test here;
# a copy left behind would shadow the working tree in later runs.
INSTALLED = os.path.expanduser("~/.ansible/collections/ansible_collections/xvs/lb")


def tool_env():
    coll = os.path.dirname(os.path.dirname(os.path.dirname(lb.__path__[0])))
    return dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
                ANSIBLE_COLLECTIONS_PATH=coll, NO_COLOR="1", ANSIBLE_FORCE_COLOR="0")


def test_molecule_default_scenario():
    shutil.rmtree(INSTALLED, ignore_errors=True)
    try:
        r = subprocess.run([os.path.join(BIN, "molecule"), "test"], cwd=ROOT, env=tool_env(),
                           capture_output=True, text=True, timeout=1800, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        for step in ("converge", "idempotence", "side_effect", "verify"):
            assert "default > %s: Executed: Successful" % step in out, out[-3000:]
    finally:
        shutil.rmtree(INSTALLED, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "xvstest", "lab.py"), "down",
                        "xvsm", "/run/xvs-molecule"], check=False)
        shutil.rmtree("/run/xvs-molecule", ignore_errors=True)
