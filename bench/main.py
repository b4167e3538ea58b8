"""xvs.lb benchmarks: `bench/run [--smoke] [packet] [profile] [levers] [forward] [control]`.

Prints every figure as a Markdown table next to the baseline it was
measured against in the same run; docs/performance.md quotes a full run.
"""
import argparse
import os
import sys
import time

from common import collection_path, machine, private_bpffs

PARTS = ("packet", "profile", "levers", "forward", "control")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help="any of %s; default: all (--smoke: packet, forward and control)" % ", ".join(PARTS))
    ap.add_argument("--smoke", action="store_true",
                    help="the cheap subset .ci/run prints: per-packet classes (smaller pressure "
                         "case), one short forwarding round and the no-change rerun")
    ap.add_argument("--runs", type=int, default=100000, help="test runs per per-packet class")
    args = ap.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error("unknown part(s) %s: choose from %s" % (", ".join(unknown), ", ".join(PARTS)))
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it loads XDP programs and builds network namespaces)")
    coll = collection_path()
    parts = args.parts or (("packet", "forward", "control") if args.smoke else PARTS)
    print("# xvs.lb benchmarks%s\n\nMachine: %s\n" % (" (smoke)" if args.smoke else "", machine()))
    with private_bpffs() as bpffs:
        for part in PARTS:
            if part not in parts:
                continue
            start = time.monotonic()
            print("## %s\n" % part)
            if part == "packet":
                import packet
                kw = {"services": 100, "per_service": 100, "flow_table": 1 << 16} if args.smoke else {}
                print(packet.run(bpffs, runs=args.runs, **kw)[1])
            elif part == "profile":
                import packet
                print(packet.profile(bpffs)[1])
            elif part == "levers":
                import packet
                print(packet.levers(bpffs)[1])
            elif part == "forward":
                import forward
                print(forward.run(bpffs, smoke=args.smoke)[1])
            else:
                import control
                print(control.run(bpffs, coll, smoke=args.smoke)[1])
            print("(%s took %.0f s)\n" % (part, time.monotonic() - start))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
