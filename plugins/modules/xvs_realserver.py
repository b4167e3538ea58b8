#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_realserver
short_description: Put the VIPs on a direct-server-return backend and set its ARP sysctls
version_added: 0.3.0
description:
  - The kernel state a backend behind an xvs.lb balancer needs for direct server return, as one
    plan, so that check mode and C(--diff) report exactly what a run changes.
  - Puts each of O(vips) on O(interface) (a /32, or a /128 without duplicate address detection,
    since a VIP is on every backend by design), or with O(state=absent) takes them off; and sets
    O(sysctls) (for L2 DSR C(arp_ignore=1) and C(arp_announce=2), so the backend never answers ARP
    for a VIP nor uses one as an ARP source).
  - The P(xvs.lb.realserver#role) role runs it; it changes nothing that is already as given.
options:
  vips:
    description: The VIPs, IPv4 or IPv6.
    type: list
    elements: str
    default: []
  interface:
    description: Where the VIPs go. C(lo) never announces them on the wire.
    type: str
    default: lo
  sysctls:
    description: Sysctl names (as C(net.ipv4.conf.all.arp_ignore)) and the values to set.
    type: dict
    default: {}
  state:
    description: V(present) puts the VIPs on O(interface), V(absent) takes them off.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: linux
requirements:
  - pyroute2 for the target's Python.
seealso:
  - module: xvs.lb.xvs_decap
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: A backend of 203.0.113.10 behind an L2 DSR balancer
  xvs.lb.xvs_realserver:
    vips: [203.0.113.10, "2001:db8:100::10"]
    sysctls:
      net.ipv4.conf.all.arp_ignore: 1
      net.ipv4.conf.all.arp_announce: 2
'''

RETURN = r'''
added:
  description: The VIPs put on O(interface) (address/prefix), or that check mode would put there.
  returned: always
  type: list
  elements: str
  sample: ["203.0.113.10/32"]
removed:
  description: The VIPs taken off O(interface).
  returned: always
  type: list
  elements: str
  sample: []
sysctls:
  description: The sysctls set (or that check mode would set), with their new values.
  returned: always
  type: dict
  sample: {"net.ipv4.conf.all.arp_ignore": "1"}
'''

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.xvs.lb.plugins.module_utils import _module, _realserver


def main():
    module = AnsibleModule(
        argument_spec=dict(
            vips=dict(type="list", elements="str", default=[]),
            interface=dict(type="str", default="lo"),
            sysctls=dict(type="dict", default={}),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        supports_check_mode=True,
    )
    if _realserver.IPRoute is None:
        module.fail_json(msg=missing_required_lib("pyroute2"))
    p = module.params

    def work():
        plan = _realserver.Plan(p["vips"], p["interface"], p["sysctls"], p["state"])
        if plan.changed and not module.check_mode:
            plan.apply()
        return plan
    plan = _module.check(module, work)
    result = {"changed": plan.changed, "added": plan.add, "removed": plan.remove, "sysctls": plan.write}
    if module._diff:
        result["diff"] = {"before": plan.before, "after": plan.after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
