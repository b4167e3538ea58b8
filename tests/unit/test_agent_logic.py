"""xvs-agent's bookkeeping without a network: rise and fall, the record
read again on change, a bad check that fails alone, min_healthy, and the
health file (in a test directory, not /run)."""
import json
import os

import pytest

from ansible_collections.xvs.lb.plugins.module_utils import (_agent, _agent_cli, _announce, _errors, _health, _journal,
                                                             _maintenance, _metrics, _spec, _state)

VIP = "203.0.113.10"
KEY = (VIP, 80, "tcp")


@pytest.fixture(autouse=True)
def health_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setattr(_health, "HEALTH_DIR", str(d))
    return d


def record(tmp_path, services):
    path = str(tmp_path / "state.json")
    _state.save(path, _state.make("/sys/fs/bpf/xvs", {"interfaces": ["eth0"]}, services))
    return path


def svc(port, *addresses, **extra):
    return dict({"address": VIP, "port": port, "protocol": "tcp", "sticky": False,
                 "destinations": [{"address": a, "weight": 1} for a in addresses]}, **extra)


class Lines(list):
    """A log that keeps each line, and its priority in .priorities."""

    def __init__(self):
        list.__init__(self)
        self.priorities = []

    def __call__(self, line, priority=_journal.INFO):
        self.append(line)
        self.priorities.append(priority)


def agent(path, **kw):
    lines = Lines()
    a = _agent.Agent(path, lines, **kw)
    assert a.reload()
    return a, lines


def test_fall_then_rise_counts_results_in_a_row(tmp_path):
    a, lines = agent(record(tmp_path, [svc(80, "192.0.2.21", check={"type": "tcp", "rise": 2, "fall": 3})]))
    t = a.targets[(KEY, "192.0.2.21")]
    a.pending = False
    for dummy in range(2):
        a.result(t, False, "refused", 0.01)
    a.result(t, True, "connected", 0.01)       # a good one in between starts the count again
    a.result(t, False, "refused", 0.01)
    a.result(t, False, "refused", 0.01)
    assert t.up and not a.pending
    a.result(t, False, "refused", 0.02)
    assert not t.up and a.pending and t.duration == 0.02
    assert lines[-1] == "xvs-agent: %s:80/tcp destination 192.0.2.21 down: refused (3 failed check(s) in a row)" % VIP
    assert lines.priorities[-1] == _journal.WARNING       # journalctl -p warning finds it
    assert a.down() == {KEY: {"192.0.2.21": "refused"}}
    a.result(t, True, "connected", 0.01)
    assert not t.up
    a.result(t, True, "connected", 0.01)
    assert t.up and a.down() == {}
    assert lines[-1].endswith("up: connected (2 good check(s) in a row)")
    assert lines.priorities[-1] == _journal.NOTICE


def test_a_bad_check_fails_alone_and_is_logged_once(tmp_path):
    path = record(tmp_path, [svc(80, "192.0.2.21", check={"type": "ftp"}),
                             svc(81, "192.0.2.22", check={"type": "tcp"}),
                             svc(82, "192.0.2.23")])
    a, lines = agent(path)
    bad, good = a.targets[(KEY, "192.0.2.21")], a.targets[((VIP, 81, "tcp"), "192.0.2.22")]
    assert len(a.targets) == 2          # no check on port 82: nothing to run there
    assert good.problem is None and good.check["interval"] == _spec.CHECK_DEFAULTS["interval"]
    ok, reason, dummy = a._check(bad)
    assert not ok and reason.startswith("check config: ") and "type=ftp" in reason
    problems = [line for line in lines if "type=ftp" in line]
    assert len(problems) == 1 and problems[0].endswith("the check fails until it is fixed")
    # the record rewritten (a destination added): read again, the problem not logged again,
    # and what the checks found so far kept
    good.up = False
    with open(path) as f:
        services = json.load(f)["services"]
    services[1]["destinations"].append({"address": "192.0.2.24", "weight": 1})
    _state.save(path, _state.make("/sys/fs/bpf/xvs", {"interfaces": ["eth0"]}, services))
    assert a.reload()
    assert len([line for line in lines if "type=ftp" in line]) == 1
    assert a.targets[((VIP, 81, "tcp"), "192.0.2.22")] is good and not good.up
    assert a.targets[((VIP, 81, "tcp"), "192.0.2.24")].up


def test_min_healthy_counts_healthy_destinations_with_weight(tmp_path):
    three = svc(80, "192.0.2.21", "192.0.2.22", "192.0.2.23", check={"type": "tcp"})
    a, dummy = agent(record(tmp_path, [dict(three, min_healthy=2)]))
    a.services[KEY]["destinations"]["192.0.2.23"]["weight"] = 0      # drained by its operator
    assert a.services_down(a.down()) == []
    a.targets[(KEY, "192.0.2.21")].up = False
    assert a.services_down(a.down()) == [KEY]


def test_a_restarted_agent_starts_from_the_health_file(tmp_path):
    path = record(tmp_path, [svc(80, "192.0.2.21", "192.0.2.22", check={"type": "tcp"})])
    _health.save(path, {KEY: {"192.0.2.22": "refused"}}, [])
    a, dummy = agent(path)
    assert a.targets[(KEY, "192.0.2.21")].up
    t = a.targets[(KEY, "192.0.2.22")]
    assert not t.up and t.reason == "refused" and a.pending
    assert _health.load(path) == {KEY: {"192.0.2.22": "refused"}}


def test_health_files_of_two_state_files_differ(tmp_path):
    one, two = _health.path_for("/etc/xvs/a/state.json"), _health.path_for("/etc/xvs/a%2Fstate.json")
    assert one != two and os.path.dirname(one) == _health.HEALTH_DIR
    bad = str(tmp_path / "state.json")
    os.makedirs(_health.HEALTH_DIR)
    with open(_health.path_for(bad), "w") as f:
        f.write("{")
    with pytest.raises(_spec.XvsError, match="not valid JSON"):
        _health.load(bad)


@pytest.mark.parametrize("text,expected", [("127.0.0.1:9405", ("127.0.0.1", 9405)),
                                           ("[::1]:9405", ("::1", 9405)), ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_metrics_listen_address(text, expected):
    assert _metrics.listen_address(text) == expected


@pytest.mark.parametrize("text", ["9405", "localhost:", ":9405", "127.0.0.1:70000", "127.0.0.1:http"])
def test_metrics_listen_address_refused(text):
    with pytest.raises(ValueError, match="address:port"):
        _metrics.listen_address(text)


# ---- announcing (see _announce) ----------------------------------------------------
def test_a_vip_is_announced_while_any_or_all_of_its_services_are_up():
    up = {(VIP, 80, "tcp"): True, (VIP, 443, "tcp"): False, ("203.0.113.11", 80, "tcp"): False}
    assert _announce.wanted(up, "any") == {VIP: True, "203.0.113.11": False}
    assert _announce.wanted(up, "all") == {VIP: False, "203.0.113.11": False}


SHOW_PROTOCOLS_ALL = (
    b"0001 BIRD 2.0.12 ready.\n"
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     13:05:47.655  \n"
    b"1006-\n"
    b"1002-xvs_192_0_2_1 BGP        ---        up     13:05:51.606  Established   \n"
    b"1006-  BGP state:          Established\n"
    b"     Neighbor address: 192.0.2.1\n"
    b"     Neighbor AS:      65000\n"
    b"1002-xvs_192_0_2_9 BGP        ---        start  13:05:47.655  Active        \n"
    b"1006-  BGP state:          Active\n"
    b"     Neighbor address: 192.0.2.9\n"
    b"0000 \n")


def fake_bird(path, reply):
    """A one-connection BIRD control socket at path answering reply."""
    import socket
    import threading
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, dummy = srv.accept()
        greeting, rest = reply.split(b"\n", 1)
        conn.sendall(greeting + b"\n")
        conn.makefile("rb").readline()
        conn.sendall(rest)
        conn.close()
        srv.close()
    threading.Thread(target=serve, daemon=True).start()


def test_bgp_sessions_from_birds_control_socket(tmp_path):
    path = str(tmp_path / "bird.ctl")
    fake_bird(path, SHOW_PROTOCOLS_ALL)
    assert _announce.bgp_sessions(path) == [
        {"protocol": "xvs_192_0_2_1", "neighbor": "192.0.2.1", "state": "up", "established": True},
        {"protocol": "xvs_192_0_2_9", "neighbor": "192.0.2.9", "state": "start", "established": False}]


def test_a_bird_error_is_an_error(tmp_path):
    path = str(tmp_path / "bird.ctl")
    fake_bird(path, b"0001 BIRD 2.0.12 ready.\n9001 syntax error\n")
    with pytest.raises(OSError, match="syntax error"):
        _announce.bgp_sessions(path)


def test_systemd_notify(tmp_path, monkeypatch):
    import socket
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    _agent_cli._notify("WATCHDOG=1")
    assert s.recv(64) == b"WATCHDOG=1"
    s.close()


def test_waiting_for_the_host_lock_keeps_saying_alive(tmp_path):
    """The agent's watchdog note goes on while another run holds the lock."""
    import fcntl
    path = str(tmp_path / "xvs.lock")
    calls = []
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(_spec.XvsError, match="held"):
            with _state.host_lock(path, timeout=0.3, waiting=lambda: calls.append(1)):
                pass
    assert len(calls) >= 3


def test_every_global_counter_has_a_metric_with_help():
    """A counter added to the data plane must reach the metrics: a frame end
    as an action or drop reason, any other counter as its own family with
    help text (a missing one broke every scrape)."""
    from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
    for name in L.COUNTERS:
        if name in _metrics.FRAME_ENDS:
            assert _metrics.FRAME_ENDS[name][0] in _metrics.HELP
        else:
            assert _metrics.counter_metric(name) in _metrics.HELP, name
    assert set(L.VERDICT_COUNTERS) <= set(_metrics.FRAME_ENDS)


class FakeAnnouncer(object):
    """The two kernel tables as {vip: state}: set() makes them hold exactly
    vips (announced) and draining, and returns the changes as the real one."""

    def __init__(self):
        self.table, self.calls = {}, 0

    def set(self, vips, draining=()):
        self.calls += 1
        want = dict.fromkeys(vips, _announce.ANNOUNCED)
        want.update(dict.fromkeys(draining, _announce.DRAINING))
        changes = dict((v, (self.table.get(v), want.get(v))) for v in set(self.table) | set(want)
                       if self.table.get(v) != want.get(v))
        self.table = want
        return changes


def test_a_vip_is_decided_once_its_own_destinations_were_checked(tmp_path):
    """A VIP whose destinations answer is announced without waiting for
    the checks of another VIP's dead ones (twenty of them, whose first
    checks take their whole timeout); that one is decided when they end."""
    dead = ["192.0.2.%d" % i for i in range(100, 120)]
    path = record(tmp_path, [svc(80, "192.0.2.21", check={"type": "tcp"}),
                             dict(svc(80, *dead, check={"type": "tcp"}), address="203.0.113.11")])
    announcer = FakeAnnouncer()
    a, lines = agent(path, announcer=announcer)
    a.service_up = {KEY: True, ("203.0.113.11", 80, "tcp"): True}
    a.announce()
    assert announcer.table == {} and a.announce_due     # nothing checked yet: nothing announced
    a.result(a.targets[(KEY, "192.0.2.21")], True, "connected", 0.01)
    a.announce()
    assert announcer.table == {VIP: _announce.ANNOUNCED} and a.announce_due
    assert lines[-1] == "xvs-agent: VIP %s announced" % VIP and lines.priorities[-1] == _journal.NOTICE
    calls = announcer.calls
    a.announce()                      # nothing new decided: the kernel is not asked again
    assert announcer.calls == calls
    for address in dead:
        a.result(a.targets[(("203.0.113.11", 80, "tcp"), address)], False, "no answer", 2.0)
    a.service_up[("203.0.113.11", 80, "tcp")] = False        # as apply() finds it after the falls
    a.announce()
    assert announcer.table == {VIP: _announce.ANNOUNCED} and not a.announce_due


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_carry_their_priority_or_a_timestamp(tmp_path, monkeypatch, journal):
    """Under systemd ($JOURNAL_STREAM names the stream) a line starts with
    the <N> journald reads as its priority; elsewhere with a timestamp and
    the priority's name.  Each line is flushed as it is written."""
    import re
    path = tmp_path / "out"
    with open(str(path), "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino if journal else st.st_ino + 1))
        log = _journal.Log(stream)
        log("xvs-agent: destination down", _journal.WARNING)
        assert path.read_text().count("\n") == 1            # there before the file is closed
        log("xvs-agent: stopped")
    text = path.read_text().splitlines()
    if journal:
        assert text == ["<4>xvs-agent: destination down", "<6>xvs-agent: stopped"]
    else:
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
        assert re.match(stamp + r" warning xvs-agent: destination down$", text[0]), text
        assert re.match(stamp + r" info xvs-agent: stopped$", text[1]), text


def test_check_failures_transitions_and_applies_reach_the_metrics(tmp_path, monkeypatch):
    """Every failed check counts, a change of state counts once with its
    time, and an apply that fails counts (the maps are not there) while
    the last success keeps its time: the series an alert needs, rendered
    as a scrape renders them."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    lock = _state.host_lock
    monkeypatch.setattr(_state, "host_lock", lambda waiting=None: lock(str(tmp_path / "lock"), waiting=waiting))
    now = [1800000000.0]
    a, lines = agent(record(tmp_path, [svc(80, "192.0.2.21", "192.0.2.22",
                                           check={"type": "tcp", "timeout": 0.5, "rise": 1, "fall": 2})]),
                     wall=lambda: now[0])
    t = a.targets[(KEY, "192.0.2.21")]
    a.result(t, False, "refused", 0.01)
    assert (t.failures, t.transitions, t.changed_at) == (1, 0, None)
    now[0] += 5
    a.result(t, False, "refused", 0.01)
    a.result(t, False, "refused", 0.01)       # already down: a failure, not a transition
    assert (t.failures, t.transitions, t.changed_at) == (3, 1, 1800000005.0)
    a.result(t, True, "connected", 0.02)
    assert (t.failures, t.transitions) == (3, 2)
    a.apply()                                 # /sys/fs/bpf/xvs holds nothing: it fails, and is retried
    a.apply()
    assert a.apply_failures == 2 and a.applied_at is None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_metrics.Collector(a))
    got = dict(((s.name, s.labels.get("destination")), s.value)
               for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples)
    assert got[("xvs_check_failures_total", "192.0.2.21")] == 3
    assert got[("xvs_destination_transitions_total", "192.0.2.21")] == 2
    assert got[("xvs_destination_last_transition_timestamp_seconds", "192.0.2.21")] == 1800000005.0
    assert got[("xvs_check_timeout_seconds", "192.0.2.21")] == 0.5
    assert got[("xvs_check_duration_seconds", "192.0.2.21")] == 0.02
    assert got[("xvs_check_failures_total", "192.0.2.22")] == 0          # never checked: zero, there to rate()
    assert ("xvs_check_duration_seconds", "192.0.2.22") not in got
    assert ("xvs_destination_last_transition_timestamp_seconds", "192.0.2.22") not in got
    assert got[("xvs_agent_apply_failures_total", None)] == 2
    assert ("xvs_agent_last_apply_success_timestamp_seconds", None) not in got
    assert got[("xvs_dataplane_up", None)] == 0
    info = [s for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples if s.name == "xvs_build_info"]
    from ansible_collections.xvs.lb.plugins.module_utils import _layout as L
    assert [(s.labels, s.value) for s in info] == [({"version": L.VERSION, "abi": str(L.ABI_VERSION), "tag": ""}, 1)]


def in_maintenance(path, drain_timeout=10.0, drain_rate=0.0):
    """The record at path put into maintenance as xvs_maintenance does."""
    r = _maintenance.MaintenanceRun(path, "/sys/fs/bpf/xvs", True, drain_timeout, drain_rate)
    r.apply()
    assert r.changed
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10 ** 9))    # the agent's reload sees a change


def test_maintenance_drains_until_the_new_flow_rate_falls_then_stays_out_across_a_restart(tmp_path):
    """Entering maintenance moves the announced VIP to the drain table; it
    is withdrawn at the first one-second sample with no new flow (not at
    the one with 50), stays out across a restart of the agent while its
    checks go on, and is announced again once the record is back in
    service."""
    path = record(tmp_path, [svc(80, "192.0.2.21", check={"type": "tcp"})])
    now, flows = [100.0], [1000]
    announcer = FakeAnnouncer()
    a, lines = agent(path, announcer=announcer, clock=lambda: now[0])
    a._new_flows = lambda: flows[0]
    a.result(a.targets[(KEY, "192.0.2.21")], True, "connected", 0.01)
    a.service_up = {KEY: True}
    a.announce()
    assert announcer.table == {VIP: _announce.ANNOUNCED}

    in_maintenance(path)
    assert a.reload() and a.maintenance["drain_timeout"] == 10.0
    a.maintain()
    assert announcer.table == {VIP: _announce.DRAINING} and a.phase == _maintenance.DRAINING
    assert _health.announcements(path) == {"maintenance": "draining", "announced": {VIP: "draining"}}
    a.announce_due = True
    a.announce()                                   # maintenance decides, not the services' health
    assert announcer.table == {VIP: _announce.DRAINING}
    now[0], flows[0] = 100.5, 1030
    a.maintain()                                   # no sample yet
    now[0], flows[0] = 101.0, 1050
    a.maintain()                                   # 50 new flows in the second: still draining
    assert a.phase == _maintenance.DRAINING
    now[0] = 102.0
    a.maintain()
    assert announcer.table == {} and a.phase == _maintenance.WITHDRAWN
    assert lines[-1] == "xvs-agent: maintenance: every VIP withdrawn: the new-flow rate fell to 0.0/s after 2.0s"
    assert _health.announcements(path) == {"maintenance": "withdrawn", "announced": {}}
    snap = a.snapshot()
    assert snap["maintenance"] and snap["phase"] == "withdrawn" and snap["announced"] == {VIP: False}

    # a restarted agent (a route a killed one left behind) stays out, and checks
    announcer.table = {VIP: _announce.ANNOUNCED}
    b, lines = agent(path, announcer=announcer, clock=lambda: now[0])
    b.maintain()
    assert announcer.table == {} and b.phase == _maintenance.WITHDRAWN
    b.result(b.targets[(KEY, "192.0.2.21")], True, "connected", 0.01)
    b.service_up = {KEY: True}
    b.announce()
    assert announcer.table == {}

    r = _maintenance.MaintenanceRun(path, "/sys/fs/bpf/xvs", False)
    r.apply()
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 2 * 10 ** 9))
    assert r.changed and "maintenance" not in _state.load(path) and b.reload()
    b.maintain()
    assert b.phase is None and b.announce_due
    b.announce()
    assert announcer.table == {VIP: _announce.ANNOUNCED}


def test_a_drain_ends_at_its_timeout_while_new_flows_keep_coming(tmp_path):
    path = record(tmp_path, [svc(80, "192.0.2.21")])
    now, flows = [0.0], [0]
    announcer = FakeAnnouncer()
    a, lines = agent(path, announcer=announcer, clock=lambda: now[0])
    a._new_flows = lambda: flows[0]
    a.service_up = {KEY: True}
    a.announce()
    in_maintenance(path, drain_timeout=3, drain_rate=5)
    a.reload()
    a.maintain()
    for dummy in range(3):
        now[0] += 1.0
        flows[0] += 6                  # above drain_rate 5
        a.maintain()
    assert announcer.table == {} and a.phase == _maintenance.WITHDRAWN
    assert lines[-1] == "xvs-agent: maintenance: every VIP withdrawn: drain_timeout 3s passed (new-flow rate 6.0/s)"


def test_maintenance_in_the_record_is_kept_by_every_run_and_checked():
    """The attach's and the services' runs carry maintenance over; a record
    without it (older) is in service and unchanged by a run."""
    m = _maintenance.section(30, 2, 1800000000.0)
    assert _state.make("/b", None, [], m)["maintenance"] == m
    assert "maintenance" not in _state.make("/b", None, [])
    assert _state.maintenance_of({"format": 1, "services": []}) is None
    with pytest.raises(_errors.XvsError, match="drain_timeout=-1: must be 0 or more seconds"):
        _maintenance.section(-1, 0, 0)
    with pytest.raises(_errors.XvsError, match="drain_rate=-0.5: must be 0 or more new flows per second"):
        _maintenance.section(1, -0.5, 0)


def test_the_modules_wait_fails_at_its_timeout_naming_what_is_left(tmp_path):
    """An agent that never acts (hung, or not running while its last word
    says announced): the wait ends at wait_timeout with the routes left and
    what the agent last said; the record keeps what the run wrote."""
    path = record(tmp_path, [svc(80, "192.0.2.21")])
    _health.save(path, {}, (), {"maintenance": None, "announced": {VIP: "announced"}})
    now = [0.0]

    def sleep(s):
        now[0] += s
    with pytest.raises(_errors.XvsError) as e:
        _maintenance.wait(path, True, lambda: {VIP: _announce.ANNOUNCED}, 3, clock=lambda: now[0], sleep=sleep)
    assert str(e.value) == ("wait_timeout=3: after 3s the VIPs are still announced (%s announced; xvs-agent says "
                            "nothing): is xvs-agent running? The record keeps the balancer in maintenance" % VIP)
    assert 3.0 <= now[0] < 3.5
    with pytest.raises(_errors.XvsError, match="after 2s xvs-agent still says withdrawn: is it running"):
        _health.save(path, {}, (), {"maintenance": "withdrawn", "announced": {}})
        _maintenance.wait(path, False, dict, 2, clock=lambda: now[0], sleep=sleep)
    # an agent that withdrew and says so: done at once, also with no agent at all
    assert _maintenance.wait(path, True, dict, 0, clock=lambda: now[0], sleep=sleep)["maintenance"] == "withdrawn"
    _health.remove(path)
    assert _maintenance.wait(path, True, dict, 0, clock=lambda: now[0], sleep=sleep) is None
