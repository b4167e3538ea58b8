"""The README's demo command works (balancing, and xvs-agent draining a
backend whose server stops) and leaves nothing behind."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_balances_over_all_backends_and_cleans_up():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "run.py"), "--requests", "18"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    first, drained = r.stdout.split("none goes to web2")
    answers = re.findall(r"^  request +\d+ from port \d+ -> (\S+)$", first, re.M)
    assert len(answers) == 18 and set(answers) == {"web1", "web2", "web3"}, r.stdout
    # xvs-agent drained web2 when its server stopped, and brought it back
    assert "agent: 203.0.113.10:80/tcp destination 192.0.2.22 down: Connection refused" in first
    answers = re.findall(r"^  request +\d+ from port \d+ -> (\S+)$", drained, re.M)
    assert len(answers) == 18 and set(answers) <= {"web1", "web3"}, r.stdout
    assert "agent: 203.0.113.10:80/tcp destination 192.0.2.22 up: HTTP status 200" in drained
    assert re.search(r'^  xvs_destination_healthy\{destination="192\.0\.2\.22",.*\} 1\.0$', drained, re.M)
    flows = dict(re.findall(r"^  192\.0\.2\.\d+ +(web\d) +\d+ +(\d+) ", r.stdout, re.M))
    assert sorted(flows) == ["web1", "web2", "web3"]
    assert sum(int(n) for n in flows.values()) == 18
    assert re.search(r"^  XDP mode on eth0: (native \(on a veth: the peer runs an XDP_PASS program|generic)",
                     r.stdout, re.M), r.stdout       # the mode it used, and what native takes on a veth
    assert "cleaned up" in r.stdout
    left = os.listdir("/run/xvs") if os.path.isdir("/run/xvs") else []
    assert not [n for n in left if "xvs-demo-" in n]     # the agent's health file
    tag = re.search(r"client (demo\d+)-cli", r.stdout).group(1)
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                     check=True).stdout
