#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_maintenance
short_description: Take an xvs.lb balancer out of the fleet gracefully, and back
version_added: 0.4.0
description:
  - Puts the balancer into maintenance (O(state=present)) or takes it back into service
    (O(state=absent)). Maintenance is kept in the state of record, so an agent restart or a
    reboot keeps the balancer out until it is taken back in.
  - Entering maintenance, xvs-agent announces every VIP it announced with the GRACEFUL_SHUTDOWN
    community (RFC 8326, 65535:0) and a lowered preference, so the routers send new flows to the
    other balancers without a withdrawal; once the balancer's new-flow rate (its data plane's
    counter, sampled every second) is at most O(drain_rate) or O(drain_timeout) has passed, it
    withdraws them. The agent keeps checking the destinations meanwhile.
  - Leaving maintenance, the agent announces the VIPs again as their services' health says.
  - Existing connections keep their backend when the routers move them, provided every balancer
    of the fleet has the same services (the same Maglev tables).
  - The announcements are the agent's (the P(xvs.lb.xvs#role) role's C(xvs_bgp)); without BGP the
    maintenance is recorded and shown, and changes nothing on the network.
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.state_file
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: linux
options:
  state:
    description:
      - V(present) puts the balancer into maintenance, V(absent) takes it back into service.
    type: str
    choices: [present, absent]
    default: present
  drain_timeout:
    description:
      - Seconds the agent waits at most for the new-flow rate to fall before it withdraws.
    type: float
    default: 60
  drain_rate:
    description:
      - New flows per second at or below which the drain is done and the VIPs are withdrawn.
    type: float
    default: 0
  wait:
    description:
      - Wait until the agent has acted. With O(state=present), until none of the agent's VIP routes
        is left in O(bgp_table) and O(bgp_drain_table) and the agent says withdrawn; with
        O(state=absent), until the agent no longer says maintenance. Fails at O(wait_timeout)
        (the record keeps what the run wrote). Check mode does not wait.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait at most; by default O(drain_timeout) and 30 more.
    type: float
  bgp_table:
    description:
      - The kernel table the agent announces VIPs in (the role's C(xvs_bgp_table)).
    type: int
    default: 4242
  bgp_drain_table:
    description:
      - The kernel table the agent announces draining VIPs in; by default O(bgp_table) + 1 (the
        role's C(xvs_bgp_drain_table)).
    type: int
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: Take this balancer out of the fleet (waits until its VIPs are withdrawn)
  xvs.lb.xvs_maintenance:
    state: present
    drain_timeout: 120

- name: Take it back in
  xvs.lb.xvs_maintenance:
    state: absent
'''

RETURN = r'''
maintenance:
  description:
    - The record's maintenance after the run; null in service.
  returned: always
  type: dict
  contains:
    since:
      description: When the balancer went into maintenance (Unix time).
      type: float
    drain_timeout:
      description: O(drain_timeout).
      type: float
    drain_rate:
      description: O(drain_rate).
      type: float
agent:
  description:
    - What xvs-agent last said of its announcements after the wait; null where no agent announces
      (no BGP) or in check mode.
  returned: always
  type: dict
  contains:
    maintenance:
      description: The agent's phase, C(draining), C(withdrawn), or null in service.
      type: str
    announced:
      description: The VIPs the agent announces, each C(announced) or C(draining).
      type: dict
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _announce, _maintenance, _module, _spec


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="present", choices=["present", "absent"]),
            drain_timeout=dict(type="float", default=_maintenance.DRAIN_TIMEOUT),
            drain_rate=dict(type="float", default=_maintenance.DRAIN_RATE),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="float"),
            bgp_table=dict(type="int", default=_spec.DEFAULT_BGP_TABLE),
            bgp_drain_table=dict(type="int"),
            bpffs=dict(type="path", default=_spec.DEFAULT_BPFFS),
            state_file=dict(type="path", default=_spec.DEFAULT_STATE_FILE),
        ),
        supports_check_mode=True,
    )
    p = module.params
    enabled = p["state"] == "present"

    def work():
        r = _maintenance.MaintenanceRun(p["state_file"], _spec.bpffs(p["bpffs"]), enabled,
                                        p["drain_timeout"], p["drain_rate"])
        if not module.check_mode:
            r.apply()
        return r

    r = _module.run(module, work)
    said = None
    if p["wait"] and not module.check_mode:
        announcer = _module.check(module, lambda: _announce.Announcer(p["bgp_table"], p["bgp_drain_table"]))
        timeout = p["wait_timeout"] if p["wait_timeout"] is not None else p["drain_timeout"] + 30
        said = _module.check(module, lambda: _maintenance.wait(p["state_file"], enabled, announcer.routes, timeout))
    result = {"changed": r.changed, "maintenance": r.maintenance, "agent": said}
    if module._diff:
        result["diff"] = {"before": {"maintenance": (r.record or {}).get("maintenance")},
                          "after": {"maintenance": r.maintenance}}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
