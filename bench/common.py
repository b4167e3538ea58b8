"""What every benchmark shares: the collection on sys.path, a private bpffs,
the baseline programs and the statistics.

Every figure is reported next to a baseline measured in the same run,
because on these shared VMs an absolute time alone means little.
"""
import atexit
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = os.path.join(ROOT, "bench", "baselines.c")


def collection_path():
    """The directory holding ansible_collections/xvs/lb -> this checkout
    (xvstest.collection), put on sys.path (module_utils import themselves
    by that name) and returned for ANSIBLE_COLLECTIONS_PATH."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' lab, packet and collection helpers
    from xvstest import collection
    work = collection.link()
    atexit.register(collection.unlink, work)      # a run leaves no directory behind in /tmp
    sys.path.insert(0, work)
    return work


@contextlib.contextmanager
def private_bpffs():
    """A bpffs of our own, so a benchmark never touches /sys/fs/bpf."""
    path = tempfile.mkdtemp(prefix="xvs-bench-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def load_baselines(dst_mac=None):
    """The programs of bench/baselines.c; dst_mac (bytes) is the backend
    MAC the ceiling writes and the sink counts."""
    from bcc import BPF
    cflags = []
    if dst_mac:
        cflags.append("-DCEILING_DST_MAC=%s" % ",".join("0x%02x" % b for b in dst_mac))
    return BPF(src_file=BASELINES.encode(), cflags=cflags)


def pin_cpu():
    """Run on the last CPU from here on: a test run executes on the
    caller's CPU, and one CPU keeps caches and frequency comparable."""
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def quantile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values):
    """median, p10, p90 of a list of numbers."""
    return {"median": statistics.median(values), "p10": quantile(values, 0.10),
            "p90": quantile(values, 0.90), "n": len(values)}


def table(rows, header):
    """A Markdown table: the results document quotes these as printed."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def machine():
    """The facts a reader needs to weigh the figures."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return "%s; %d CPUs; kernel %s" % (model, os.cpu_count(), os.uname().release)
