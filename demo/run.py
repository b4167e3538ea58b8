"""The xvs.lb demo: a lab of network namespaces (a client, the balancer,
three backends serving HTTP with the VIP on lo), the balancer configured by
ansible-playbook with the collection's role, real requests through the
VIP, what an operator wants to see, and xvs-agent draining a backend whose
server stops and bringing it back.  Run by scripts/demo as root."""
import argparse
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from xvstest import collection  # noqa: E402  (the tests' helpers, reused)
from xvstest.lab import VIP, curl, dsr_lab, http_server, stop_http_server, wait_for  # noqa: E402

BACKENDS = {"web1": "192.0.2.21", "web2": "192.0.2.22", "web3": "192.0.2.23"}
BIN = os.path.dirname(sys.executable)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it builds network namespaces and loads XDP)")

    work = tempfile.mkdtemp(prefix="xvs-demo-")
    collection.link(os.path.join(work, "collections"))
    bpffs = os.path.join(work, "bpffs")
    os.mkdir(bpffs)
    subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(work, "collections"),
               ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    lab_cm = dsr_lab("demo", pathlib.Path(work), BACKENDS)
    lab = lab_cm.__enter__()
    bal = lab.name("bal")
    try:
        print("== lab: client %s, balancer %s, backends %s; VIP %s" % (
            lab.name("cli"), bal, ", ".join("%s=%s" % kv for kv in BACKENDS.items()), VIP))
        print("== ansible-playbook demo/playbook.yml (in the balancer's namespace)")
        ansible = ["ip", "netns", "exec", bal]
        # the lab's balancer keeps its state of record in the lab's directory,
        # not in this host's /etc/xvs
        where = {"bpffs": os.path.join(bpffs, "lb"), "state_file": os.path.join(work, "state.json")}
        extra = json.dumps(dict(where, work=work))
        subprocess.run(ansible + [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c",
                                  "local", "-e", extra, os.path.join(ROOT, "demo", "playbook.yml")],
                       env=env, check=True)

        print("== %d requests from the client to http://%s/whoami" % (args.requests, VIP))
        requests(lab, args.requests, 40000)

        out = subprocess.run(ansible + [os.path.join(BIN, "ansible"), "localhost", "-i", "localhost,",
                                        "-c", "local", "-m", "xvs.lb.xvs_info", "-a",
                                        json.dumps(where), "-o"],
                             env=env, check=True, capture_output=True, text=True).stdout
        info = json.loads(out.split("=>", 1)[1])
        names = dict((v, k) for k, v in BACKENDS.items())
        print("== xvs_info: per destination (replies go straight to the client: DSR)")
        header = ("destination", "", "weight", "new flows", "packets", "bytes")
        print("  %-12s %-6s %-7s %9s %9s %10s" % header)
        for s in info["services"]:
            for d in s["destinations"]:
                c = d["counters"]
                row = (d["address"], names.get(d["address"], ""), d["weight"], c["new_flows"],
                       c["packets"], c["bytes"])
                print("  %-12s %-6s %-7d %9d %9d %10d" % row)
        g = info["counters"]
        print("  balancer: %d frames seen, %d forwarded (XDP_TX), %d passed to the kernel"
              % (g["rx_packets"], g["tx"], g["pass"]))
        for ifname, mode in sorted(info["attachment"]["interfaces"].items()):
            print("  XDP mode on %s: %s%s" % (ifname, mode, VETH_NOTE if mode == "native" else ""))
        health_checks(lab, work, args.requests)
        if args.keep:
            print("== the lab is left running. Tear it down with:")
            print("  for ns in $(ip netns list | awk '/^%s-/{print $1}'); do ip netns del $ns; done"
                  % lab.tag)
            print("  pkill -f 'http.server 80 --bind|xvstest/echo.py|%s/xvs-agent'; umount %s; rm -rf %s %s"
                  % (work, bpffs, work, health_file(work)))
            return
    finally:
        if not args.keep:
            lab_cm.__exit__(None, None, None)
            subprocess.run(["umount", "-l", bpffs], check=False)
            subprocess.run(["rm", "-rf", work, health_file(work)], check=False)
    print("== cleaned up: namespaces, XDP program, pins and servers are gone "
          "(--keep leaves the lab up and prints how to tear it down)")


# What native XDP on a veth takes (README, "Labs on veth pairs"): the lab
# does both, or every forwarded frame would be lost.
VETH_NOTE = (" (on a veth: the peer runs an XDP_PASS program so XDP_TX frames are received, and "
             "the client's tx checksum offload is off so forwarded TCP carries full checksums)")


def requests(lab, n, first_port):
    for i in range(n):
        r = curl(lab, "whoami", first_port + i)
        print("  request %2d from port %d -> %s" % (i + 1, first_port + i,
                                                    r.stdout or "FAILED (%d)" % r.returncode))


def health_file(work):
    """The agent's health file of the demo's state of record (see
    plugins/module_utils/_health.py: one per state file, in /run/xvs)."""
    name = os.path.join(work, "state.json").replace("%", "%25").replace("/", "%2F")
    return os.path.join("/run/xvs", name + ".health")


def health_checks(lab, work, n):
    """Start xvs-agent with the command of the unit the role wrote, stop
    web2's server, show the drain, bring it back, show the metrics."""
    bal = lab.name("bal")
    with open(os.path.join(work, "xvs-agent.service")) as f:
        command = [x for x in f.read().splitlines() if x.startswith("ExecStart=")][0][len("ExecStart="):]
    log_path = os.path.join(work, "agent.log")
    with open(log_path, "w") as log:
        lab.procs.append(subprocess.Popen(["ip", "netns", "exec", bal] + shlex.split(command), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    def said(pattern):
        with open(log_path) as f:
            return re.search(pattern, f.read(), re.M)
    print("== xvs-agent, started with its unit's command (no systemd in the lab), checks each backend")
    wait_for(lambda: said("checked destination"), timeout=20, what="the agent")
    print("== web2's HTTP server stops")
    stop_http_server(lab, "web2")
    wait_for(lambda: said(r"192\.0\.2\.22 down"), timeout=20, what="web2 drained")
    print("  agent: " + said(r"xvs-agent: (.*192\.0\.2\.22 down.*)$").group(1))
    print("== %d new requests: none goes to web2" % n)
    requests(lab, n, 41000)
    print("== web2's server is back")
    http_server(lab, "web2", pathlib.Path(work) / "web2")
    wait_for(lambda: said(r"192\.0\.2\.22 up"), timeout=20, what="web2 back")
    print("  agent: " + said(r"xvs-agent: (.*192\.0\.2\.22 up.*)$").group(1))
    print("== metrics for Prometheus (curl http://127.0.0.1:9405/metrics on the balancer), some of them")
    text = lab.sh(bal, "curl -sf http://127.0.0.1:9405/metrics").stdout
    for line in text.splitlines():
        if re.match(r"xvs_(service_up|destination_healthy|destination_new_flows_total|received_packets_total)",
                    line):
            print("  " + line)


if __name__ == "__main__":
    main()
