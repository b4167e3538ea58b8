"""Shared fixtures: the collection on sys.path, a private bpffs, root checks.

Tests that need root, bpf or network namespaces fail (never skip) when
they cannot have them: CI must not pass on a machine that tested nothing.
"""
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.join(ROOT, "tests"))
from xvstest import collection  # noqa: E402  (tests/ just put on the path)

_COLL = collection.link()
sys.path.insert(0, _COLL)


def pytest_unconfigure(config):
    collection.unlink(_COLL)


def _stat(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


@pytest.fixture(scope="session", autouse=True)
def host_state_of_record_untouched():
    """No test may write this host's own state of record (the modules'
    default state_file): a test balancer recorded there would be refused
    by, or restored on, the host's real one."""
    from ansible_collections.xvs.lb.plugins.module_utils import _spec
    before = _stat(_spec.DEFAULT_STATE_FILE)
    yield
    assert _stat(_spec.DEFAULT_STATE_FILE) == before, (
        "the test run wrote %s: give every module run its own state_file" % _spec.DEFAULT_STATE_FILE)


def require_root():
    if os.geteuid() != 0:
        pytest.fail("this test needs root (bpf(2), bpffs, network namespaces); run it as root")


@pytest.fixture(scope="session")
def bpffs():
    """A bpffs mounted outside /sys for this test session, unmounted after."""
    require_root()
    path = tempfile.mkdtemp(prefix="xvs-test-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    yield path
    subprocess.run(["umount", "-l", path], check=False)
    os.rmdir(path)


@pytest.fixture
def pin_root(bpffs, request):
    """A fresh pin root per test; every pin under it removed afterwards."""
    from ansible_collections.xvs.lb.plugins.module_utils import _loader
    root = os.path.join(bpffs, request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
                        .replace(".", "_"))[:200]
    yield root
    _loader.unpin_all(root)
