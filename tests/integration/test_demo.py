"""The README's demo command works and leaves nothing behind."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_balances_over_all_backends_and_cleans_up():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "run.py"), "--requests", "18"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    answers = re.findall(r"^  request +\d+ from port \d+ -> (\S+)$", r.stdout, re.M)
    assert len(answers) == 18 and set(answers) == {"web1", "web2", "web3"}, r.stdout
    flows = dict(re.findall(r"^  192\.0\.2\.\d+ +(web\d) +\d+ +(\d+) ", r.stdout, re.M))
    assert sorted(flows) == ["web1", "web2", "web3"]
    assert sum(int(n) for n in flows.values()) == 18
    assert "cleaned up" in r.stdout
    tag = re.search(r"client (demo\d+)-cli", r.stdout).group(1)
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                     check=True).stdout
