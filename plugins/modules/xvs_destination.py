#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_destination
short_description: Manage one destination (real server) of an xvs.lb service
version_added: 0.1.0
description:
  - Adds, re-weights, drains or removes one destination of a service created with
    M(xvs.lb.xvs_service).
  - The destination is resolved on the balancer to the attached interface (or trunk VLAN) it
    is on-link through and to its MAC address, from the neighbour table with one active probe
    when it is missing, unless O(mac) is given.
  - Weight 0 drains the destination; removing it makes its flows select again.
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.protocol
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: linux
options:
  service_address:
    description:
      - The VIP of the service.
    type: str
    required: true
  service_port:
    description:
      - The port of the service.
    type: int
    required: true
  address:
    description:
      - The destination's IPv4 address.
    type: str
    required: true
  weight:
    description:
      - Share of new flows relative to the service's other destinations; 0 drains.
    type: int
    default: 1
  mac:
    description:
      - The destination's MAC address, instead of resolving it. Required for destinations on a
        VLAN of a trunk, which the balancer cannot probe.
    type: str
  state:
    description:
      - Whether the destination should be part of the service.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: xvs.lb.xvs_service
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: Add a web server to the HTTP service
  xvs.lb.xvs_destination:
    service_address: 203.0.113.10
    service_port: 80
    address: 192.0.2.24

- name: Drain it before maintenance (established connections continue)
  xvs.lb.xvs_destination:
    service_address: 203.0.113.10
    service_port: 80
    address: 192.0.2.24
    weight: 0

- name: Remove it
  xvs.lb.xvs_destination:
    service_address: 203.0.113.10
    service_port: 80
    address: 192.0.2.24
    state: absent
'''

RETURN = r'''
destination:
  description: The destination after the run (null when absent).
  returned: always
  type: dict
  contains:
    address:
      description: Its address.
      type: str
      sample: 192.0.2.24
    weight:
      description: Its weight.
      type: int
      sample: 1
    mac:
      description: The MAC address frames are sent to.
      type: str
      sample: "02:00:c0:00:02:18"
    interface:
      description: The attached interface it is reached through.
      type: str
      sample: eth0
    vlan:
      description: The 802.1Q VLAN id on that interface, 0 when untagged.
      type: int
      sample: 0
service:
  description: The service after the run, with all its destinations (see M(xvs.lb.xvs_service)).
  returned: always
  type: dict
  sample:
    address: 203.0.113.10
    port: 80
    protocol: tcp
    sticky: false
    destinations: []
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _control as C


def main():
    module = AnsibleModule(
        argument_spec=dict(
            service_address=dict(type="str", required=True),
            service_port=dict(type="int", required=True),
            protocol=dict(type="str", default="tcp", choices=["tcp", "udp"]),
            address=dict(type="str", required=True),
            weight=dict(type="int", default=1),
            mac=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            bpffs=dict(type="path", default=C.DEFAULT_BPFFS),
        ),
        supports_check_mode=True,
    )
    p, addr = C.run_plan(module, C.plan_destination)
    dest = [d for d in p.after["destinations"] if d["address"] == addr]
    result = dict(changed=p.changed, service=p.after, destination=dest[0] if dest else None)
    if module._diff:
        result["diff"] = p.diff()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
