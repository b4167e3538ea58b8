"""The xvs.lb demo: a lab of network namespaces (a client, the balancer,
three backends serving HTTP with the VIP on lo), the balancer configured by
ansible-playbook with the collection's modules, real requests through the
VIP, and what an operator wants to see.  Run by scripts/demo as root."""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from xvstest.lab import VIP, curl, dsr_lab  # noqa: E402  (the tests' lab, reused)

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
    coll = os.path.join(work, "collections", "ansible_collections", "xvs")
    os.makedirs(coll)
    os.symlink(ROOT, os.path.join(coll, "lb"))
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
        extra = json.dumps(where)
        subprocess.run(ansible + [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c",
                                  "local", "-e", extra, os.path.join(ROOT, "demo", "playbook.yml")],
                       env=env, check=True)

        print("== %d requests from the client to http://%s/whoami" % (args.requests, VIP))
        for i in range(args.requests):
            r = curl(lab, "whoami", 40000 + i)
            print("  request %2d from port %d -> %s" % (i + 1, 40000 + i,
                                                        r.stdout or "FAILED (%d)" % r.returncode))

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
        print("  balancer: %d frames seen, %d forwarded (XDP_TX), %d passed to the kernel, "
              "attached %s" % (g["rx_packets"], g["tx"], g["pass"],
                               info["attachment"]["interfaces"]))
        if args.keep:
            print("== the lab is left running. Tear it down with:")
            print("  for ns in $(ip netns list | awk '/^%s-/{print $1}'); do ip netns del $ns; done"
                  % lab.tag)
            print("  pkill -f 'http.server 80 --bind|xvstest/echo.py'; umount %s; rm -rf %s"
                  % (bpffs, work))
            return
    finally:
        if not args.keep:
            lab_cm.__exit__(None, None, None)
            subprocess.run(["umount", "-l", bpffs], check=False)
            subprocess.run(["rm", "-rf", work], check=False)
    print("== cleaned up: namespaces, XDP program, pins and servers are gone "
          "(--keep leaves the lab up and prints how to tear it down)")


if __name__ == "__main__":
    main()
