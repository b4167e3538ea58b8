"""Security: the maps and the files that configure the
balancer belong to root alone, and no module option reaches the compiler
command line or a shell unvalidated.  The threat model is in
docs/reliability.md."""
import os
import re
import stat

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader, _spec, _state
from xvstest.packets import harness

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pins_and_pin_root_are_root_only(pin_root):
    old = os.umask(0o022)            # a typical umask must not widen anything
    try:
        with harness(pin_root):
            pass
    finally:
        os.umask(old)
    st = os.stat(pin_root)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    names = os.listdir(pin_root)
    assert set(L.MAPS) <= set(names)
    for name in names:
        st = os.stat(os.path.join(pin_root, name))
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (name, oct(st.st_mode))
        assert st.st_uid == 0


def test_host_lock_file_is_root_only(tmp_path):
    path = str(tmp_path / "lock" / "xvs.lock")
    with _state.host_lock(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_state_of_record_is_root_only_whatever_the_umask(tmp_path):
    """The record names every backend: written 0600 in a 0700 directory
    even under umask 0, and a world-readable file it replaces is gone, not
    rewritten in place (a reader holding it open sees the old bytes)."""
    path = str(tmp_path / "etc" / "state.json")
    old = os.umask(0)
    try:
        _state.save(path, _state.make("/run/x/lb", None, []))
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        os.chmod(path, 0o644)
        inode = os.stat(path).st_ino
        _state.save(path, _state.make("/run/x/lb", None, []))
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert st.st_ino != inode
    assert os.listdir(os.path.dirname(path)) == ["state.json"]


@pytest.mark.parametrize("value", ["64 -DX=1", "64; rm -rf /", 1.5, True, "64\n", "0x40", [64],
                                   -1, 1 << 40])
def test_sizes_reach_the_compiler_only_as_integers(value):
    with pytest.raises(L.SizeError, match="max_services"):
        L.sizes(max_services=value)


def test_compiler_flags_hold_only_the_root_and_integers():
    flags = _loader.cflags("/run/x/lb", L.sizes())
    assert flags[0] == '-DXVS_PIN_ROOT="/run/x/lb"'
    assert all(re.fullmatch(r"-D[A-Z_0-9]+=\d+", f) for f in flags[1:]), flags


@pytest.mark.parametrize("root", ['/run/x/"; system("id"); "', "relative/lb", "/run/x\\lb", "/run/x\nlb", 7])
def test_bpffs_paths_that_could_escape_the_c_string_are_refused(root):
    with pytest.raises(_spec.XvsError, match="bpffs"):
        _spec.bpffs(root)


# The one process anything here starts: xvs-agent's exec health check, the
# command an operator recorded (root-only state file), as an argument list.
EXEC_CHECK = "subprocess.run(shlex.split(check[\"command\"]), env=env"


def test_no_shell_anywhere_in_the_plugins():
    """The modules talk netlink and bpf(2) directly; nothing they run goes
    through a shell, so no option can be interpreted by one.  The agent's
    exec check (a probe) is the one subprocess, started without a shell."""
    bad = re.compile(r"shell\s*=\s*True|os\.system|os\.popen|subprocess\.\w+\(|run_command|use_unsafe_shell")
    hits = []
    for d, _dirs, files in os.walk(os.path.join(ROOT, "plugins")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(d, f)).read()
                hits += ["%s: %s" % (f, m.group(0)) for m in bad.finditer(text)]
    assert hits == ["_probes.py: subprocess.run("]
    with open(os.path.join(ROOT, "plugins", "module_utils", "_probes.py")) as f:
        assert EXEC_CHECK in f.read()
