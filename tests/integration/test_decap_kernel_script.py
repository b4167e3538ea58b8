"""The realserver role's kernel method (roles/realserver/files/xvs-decap-kernel)
against stand-ins for ip, modprobe and sysctl: this kernel has no ipip, fou
or ip6_tunnel module, so what the script asks of them, and that a second
run asks nothing (the role's changed), is what can be checked here.  The
stand-ins keep their state in files; /sys/module, which the script reads
for loaded modules, is a directory of the test bind-mounted over it in a
mount namespace of each run's own."""
import os
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "roles", "realserver", "files", "xvs-decap-kernel")

# ip link show/set, ip fou show/add/del, as iproute2 prints them (a link's
# flags in <...>; `ip fou show` one line per port: "port P gue", " -6" for IPv6)
IP = r'''#!/bin/sh
s=$XVS_STATE
echo "ip $*" >> $s/calls
case "$1 $2" in
"link show") [ -e $s/link-$3 ] || exit 1; echo "9: $3@NONE: <NOARP$(cat $s/link-$3)> mtu 1480"; exit 0;;
"link set") [ "$4" = up ] && echo ",UP,LOWER_UP" > $s/link-$3 || : > $s/link-$3; exit 0;;
"fou show") cat $s/fou 2>/dev/null; exit 0;;
"fou add") echo "port $4 gue${6:+ $6}" >> $s/fou; exit 0;;
"fou del") grep -vx "port $4 gue${5:+ $5}" $s/fou > $s/fou.new; mv $s/fou.new $s/fou; exit 0;;
esac
exit 2
'''
MODPROBE = r'''#!/bin/sh
echo "modprobe $*" >> $XVS_STATE/calls
mkdir /sys/module/$1
case $1 in ipip) : > $XVS_STATE/link-tunl0;; ip6_tunnel) : > $XVS_STATE/link-ip6tnl0;; esac
'''
SYSCTL = r'''#!/bin/sh
echo "sysctl $*" >> $XVS_STATE/calls
case $1 in
-n) cat $XVS_STATE/sysctl-$2 2>/dev/null || echo 1;;
-qw) echo ${2#*=} > $XVS_STATE/sysctl-${2%%=*};;
esac
'''


@pytest.fixture
def run(tmp_path):
    state, stubs, modules = tmp_path / "state", tmp_path / "bin", tmp_path / "modules"
    for d in (state, stubs, modules):
        d.mkdir()
    for name, text in (("ip", IP), ("modprobe", MODPROBE), ("sysctl", SYSCTL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)

    def script(*args, check=False):
        """The script's output lines and the commands it ran (check: as
        the role runs it in check mode)."""
        (state / "calls").write_text("")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount --bind "$0" /sys/module && exec sh "$@"', str(modules), SCRIPT] + list(args),
                           env=dict(os.environ, PATH="%s:%s" % (stubs, os.environ["PATH"]), XVS_STATE=str(state),
                                    XVS_CHECK="1" if check else ""),
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines(), (state / "calls").read_text().splitlines()
    return script


def test_gue_for_ipv4_and_ipv6_vips_then_nothing_to_do_then_absent(run):
    out, calls = run("gue", "6080", "present", "6")
    assert out == ["loaded ipip", "loaded fou", "loaded ip6_tunnel", "tunl0 up", "tunl0 rp_filter 0",
                   "ip6tnl0 up", "fou port 6080 gue", "fou port 6080 gue -6"]
    assert "ip fou add port 6080 gue -6" in calls and "ip link set ip6tnl0 up" in calls
    out, calls = run("gue", "6080", "present", "6")
    assert out == [] and not [c for c in calls if " add " in c or " set " in c or c.startswith("modprobe")]
    out, calls = run("gue", "6080", "absent", "6")
    assert out == ["fou port 6080 removed", "fou port 6080 -6 removed", "tunl0 down", "ip6tnl0 down"]
    assert "ip fou del port 6080 -6" in calls
    assert run("gue", "6080", "absent", "6")[0] == []


def test_ipip_for_ipv4_vips_opens_no_gue_port_and_loads_no_ipv6_tunnel(run):
    out, calls = run("ipip", "6080", "present")
    assert out == ["loaded ipip", "tunl0 up", "tunl0 rp_filter 0"]
    assert not [c for c in calls if "fou add" in c or "ip6_tunnel" in c]
    assert run("ipip", "6080", "present")[0] == []
    # a GUE port for IPv4 only, on another port: the IPv6 one is not taken for it
    out, calls = run("gue", "7000", "present")
    assert out == ["loaded fou", "fou port 7000 gue"]


def test_check_mode_reports_the_changes_and_makes_none(run):
    """What the role's check mode sees: the lines of a real run, and only
    reads (show, sysctl -n) done."""
    out, calls = run("gue", "6080", "present", "6", check=True)
    assert out == ["loaded ipip", "loaded fou", "loaded ip6_tunnel", "tunl0 up", "tunl0 rp_filter 0",
                   "ip6tnl0 up", "fou port 6080 gue", "fou port 6080 gue -6"]
    assert [c for c in calls if " show" not in c and not c.startswith("sysctl -n")] == []
    assert run("gue", "6080", "present", "6")[0] == out       # the real run then makes those
    assert run("gue", "6080", "absent", "6", check=True)[0] == [
        "fou port 6080 removed", "fou port 6080 -6 removed", "tunl0 down", "ip6tnl0 down"]
    assert run("gue", "6080", "present", "6", check=True)[0] == []   # nothing was removed
