"""The README's two commands (scripts/demo, scripts/test) and bench/run
work as root, and for a user: lifted with sudo where sudo exists, refused
in one line where it does not."""
import collections
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["scripts/demo", "scripts/test", "bench/run"]


@pytest.fixture
def tree():
    """The scripts in a directory an unprivileged user can reach (the
    checkout, and pytest's tmp_path, may be root-only), and a stand-in sudo
    that prints what it was asked to run."""
    top = tempfile.mkdtemp(prefix="xvs-scripts-")
    try:
        os.chmod(top, 0o755)
        for rel in SCRIPTS + ["scripts/as-root"]:
            os.makedirs(os.path.join(top, os.path.dirname(rel)), mode=0o755, exist_ok=True)
            shutil.copy(os.path.join(ROOT, rel), os.path.join(top, rel))
        os.makedirs(os.path.join(top, "fakebin"), mode=0o755)
        with open(os.path.join(top, "fakebin", "sudo"), "w") as f:
            f.write('#!/bin/sh\necho "sudo $*"\n')
        os.chmod(os.path.join(top, "fakebin", "sudo"), 0o755)
        yield top
    finally:
        shutil.rmtree(top)


def as_nobody(cmd):
    return subprocess.run(["su", "nobody", "-s", "/bin/bash", "-c", cmd], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False, cwd="/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_user_without_sudo_is_told_to_run_it_as_root(tree, script):
    r = as_nobody("PATH=/usr/bin:/bin; %s/%s --x" % (tree, script))
    assert r.returncode == 1
    assert r.stderr.strip() == "%s/%s: needs root (packages, network namespaces, XDP): run it as root" % (
        tree, script)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_user_with_sudo_is_lifted_with_the_same_arguments(tree, script):
    r = as_nobody("PATH=%s/fakebin:/usr/bin:/bin; %s/%s --requests 3" % (tree, tree, script))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sudo -- bash %s/%s --requests 3" % (tree, script)


def test_test_modules_have_unique_basenames():
    """pytest imports test files without packages by basename: two
    test_x.py in different directories stop the whole run at collection."""
    names = collections.Counter(name for dummy, dummy2, files in os.walk(os.path.join(ROOT, "tests"))
                                for name in files if name.startswith("test_") and name.endswith(".py"))
    assert [n for n, count in names.items() if count > 1] == []
