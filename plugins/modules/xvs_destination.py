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
  - A front end of M(xvs.lb.xvs_services) for one destination, run by the same planner. The change is
    recorded in O(state_file), so a drain survives a reboot.
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.state_file
  - xvs.lb.xvs.wait_drained
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
      - The destination's address, of the service's family (IPv4 or IPv6).
    type: str
    required: true
  weight:
    description:
      - Share of new flows relative to the service's other destinations; 0 drains.
    type: int
    default: 1
  mac:
    description:
      - The destination's MAC address (for a tunnel, its next hop's), instead of resolving it. Required for destinations on a
        VLAN of a trunk, which the balancer cannot probe.
    type: str
  state:
    description:
      - Whether the destination should be part of the service.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: xvs.lb.xvs_services
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
moved:
  description: The share of each written service's Maglev table that moves, as RV(xvs.lb.xvs_services#module:moved).
  returned: always
  type: list
  elements: dict
  sample: []
drained:
  description: The destination's live flows when O(wait_drained) ended, as RV(xvs.lb.xvs_services#module:drained).
  returned: when O(wait_drained) is given, not in check mode
  type: list
  elements: dict
  sample: []
unresolved:
  description:
    - Desired destinations, of any service, left out of the maps because they did not answer (each
      also a warning), as RV(xvs.lb.xvs_services#module:unresolved) describes.
  returned: always
  type: list
  elements: dict
  sample: []
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
      description: Its weight in the maps (0 while failing its health check).
      type: int
      sample: 1
    state:
      description:
        - C(up); C(drained) (weight 0, no new connection, established ones continue); or C(failing)
          (xvs-agent's check failed, every packet of its flows goes to another destination).
      type: str
      sample: up
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
    forwarding: l2
    destinations: []
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _module, _planner, _spec


def main():
    module = AnsibleModule(
        argument_spec=dict(
            service_address=_spec.SERVICE_OPTIONS["address"],
            service_port=_spec.SERVICE_OPTIONS["port"],
            protocol=_spec.SERVICE_OPTIONS["protocol"],
            address=_spec.DESTINATION_OPTIONS["address"],
            weight=dict(_spec.DESTINATION_OPTIONS["weight"], default=_spec.DEFAULT_WEIGHT),
            mac=_spec.DESTINATION_OPTIONS["mac"],
            state=dict(type="str", default="present", choices=["present", "absent"]),
            wait_drained=dict(type="dict", options=_module.WAIT_DRAINED_OPTIONS),
            **_spec.COMMON_OPTIONS
        ),
        supports_check_mode=True,
    )
    p = module.params

    def check():
        key = (_spec.ip("service_address", p["service_address"]),
               _spec.port("service_port", p["service_port"]), _spec.protocol("protocol", p["protocol"]))
        dest = _spec.destination("", dict((k, p[k]) for k in ("address", "weight", "mac")))
        if _spec.family(dest["address"]) != _spec.family(key[0]):
            raise _spec.XvsError("address=%s: an IPv%d destination for the IPv%d VIP %s: a service and its "
                                 "destinations are one family" % (dest["address"], _spec.family(dest["address"]),
                                                                  _spec.family(key[0]), key[0]))
        return key, dest
    key, dest = _module.check(module, check)

    def transform(before):
        if key not in before:
            raise _spec.XvsError("service_address=%s service_port=%d protocol=%s: no such service; "
                                 "create it with xvs.lb.xvs_service" % key)
        if p["state"] == "absent":
            return _planner.remove_destination(key, dest["address"])(before)
        # one destination merged: every other option of the service left out
        return _planner.merged(before, {key: _spec.left_out(key, [dest])})

    def view(r, bal):
        svc = _module.service_view(r, bal, key)
        found = [d for d in svc["destinations"] if d["address"] == dest["address"]]
        return svc, found[0] if found else None
    _module.check_wait_drained(module)
    r, (service, destination) = _module.converge(module, transform,
                                                 {(key, dest["address"]): "address"}, view)
    drained = _module.wait_drained(module, r, {key: dest["address"]})
    _module.exit_with(module, r, key, service=service, destination=destination,
                      **({"drained": drained} if drained is not None else {}))


if __name__ == "__main__":
    main()
