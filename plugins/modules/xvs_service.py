#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_service
short_description: Manage a virtual service of the xvs.lb XDP load balancer
version_added: 0.1.0
description:
  - Creates, changes or removes a virtual service (VIP, port and protocol) of the XDP load
    balancer attached with M(xvs.lb.xvs_attach), and optionally its destinations.
  - New flows pick a destination from a weighted Maglev table; established flows keep theirs.
  - A front end of M(xvs.lb.xvs_services) for one service, run by the same planner. O(state=present)
    is its V(merged) (V(replaced) with O(purge_destinations=true)), O(state=absent) its V(deleted).
    The change is recorded in O(state_file).
  - Destinations are resolved on the balancer to the attached interface (or trunk VLAN) they
    are on-link through and to their MAC address (from the neighbour table, probing once).
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.state_file
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
  address:
    description:
      - The virtual IP address of the service, IPv4 or IPv6.
    type: str
    required: true
  port:
    description:
      - The service's port, 1 to 65535.
    type: int
    required: true
  sticky:
    description:
      - Select destinations by client and VIP address only, so every connection of one client
        goes to the same destination, and fragments of the service's traffic can be forwarded.
    type: bool
    default: false
  destinations:
    description:
      - Destinations to make present with these weights.
      - Destinations of the service not listed are kept, unless O(purge_destinations=true).
      - Omit to leave the destinations as they are.
    type: list
    elements: dict
    suboptions:
      address:
        description:
          - The destination's address (the VIP's family), on-link through an attached interface (l2) or routed through one (tunnels).
        type: str
        required: true
      weight:
        description:
          - Share of new flows, relative to the other destinations; 0 drains (no new flows,
            established flows continue).
        type: int
        default: 1
      mac:
        description:
          - The destination's MAC address (for a tunnel, its next hop's), instead of resolving it.
        type: str
  check:
    description:
      - The health check the balancer's xvs-agent (installed by the xvs role) runs against each
        destination's own address. A destination that fails O(check.fall) checks in a row gets
        effective weight 0 (no new flows; established flows continue) until it passes O(check.rise)
        in a row; its desired weight, the state of record, is never changed by health.
      - Without a check a destination counts as healthy. With O(state=merged) a given check
        replaces the current one whole; O(state=replaced) or O(state=overridden) without it removes it.
    type: dict
    suboptions:
      type:
        description:
          - V(tcp) connects; V(http) and V(https) GET O(check.path) and expect O(check.expect_status)
            (https does not verify the certificate); V(exec) runs O(check.command) on the balancer.
        type: str
        required: true
        choices: [tcp, http, https, exec]
      port:
        description:
          - The port checked. Default the service's port.
        type: int
      path:
        description:
          - V(http) and V(https) only. The path to GET. Default V(/).
        type: str
      host:
        description:
          - V(http) and V(https) only. The Host header (and TLS server name). Default the
            destination's address.
        type: str
      expect_status:
        description:
          - V(http) and V(https) only. The status of a healthy answer, 100 to 599. Default V(200).
        type: int
      command:
        description:
          - V(exec) only, and required. A command line run without a shell, with the environment
            variables E(XVS_DESTINATION), E(XVS_PORT) (the port checked), E(XVS_SERVICE_ADDRESS),
            E(XVS_SERVICE_PORT) and E(XVS_SERVICE_PROTOCOL). Exit status 0 is healthy.
        type: str
      interval:
        description:
          - Seconds from one check of a destination to the next, 0.1 to 3600. Default V(2).
        type: float
      timeout:
        description:
          - Seconds a check may take before it counts as failed, 0.1 to O(check.interval).
            Default V(1).
        type: float
      rise:
        description:
          - Good checks in a row that bring a failed destination back, 1 to 100. Default V(2).
        type: int
      fall:
        description:
          - Failed checks in a row that drain a destination, 1 to 100. Default V(3).
        type: int
  forwarding:
    description:
      - How the balancer reaches the destinations (docs/design.md §2.13).
      - V(l2) (layer-2 direct server return) rewrites the frame's MAC addresses; every destination
        must be on-link through an attached interface.
      - V(ipip) puts an outer IPv4 header (protocol 4) in front of the client's packet and V(gue) an
        outer IPv4 and UDP header (GUE variant 1, to O(gue_port)). Destinations may be anywhere
        the balancer routes to through an attached interface; the next hop is the kernel's route
        to each destination, the outer source the route's source address (the balancer's address
        on that interface) or O(xvs.lb.xvs_attach#module:tunnel_source). A packet that would not
        fit the egress MTU once encapsulated is answered with an ICMP fragmentation-needed. The realservers must decapsulate
        (the P(xvs.lb.realserver#role) role's C(realserver_decap)).
      - For an IPv6 service, V(ipip) is IPv6-in-IPv6 (next header 41) and V(gue) GUE over IPv6, whose UDP
        checksum the balancer sums over the datagram.
    type: str
    choices: [l2, ipip, gue]
    default: l2
  gue_port:
    description:
      - With O(forwarding=gue), the UDP port the realservers decapsulate GUE on. Default V(6080).
      - The UDP source port is taken from the flow's hash, so ECMP and RSS on the way spread flows.
    type: int
  min_healthy:
    description:
      - The service is down, as xvs-agent reports it (metric C(xvs_service_up)), while fewer of its
        destinations than this are healthy with a desired weight above 0. Default V(1).
    type: int
  purge_destinations:
    description:
      - With O(destinations) given, remove every destination not listed.
    type: bool
    default: false
  state:
    description:
      - Whether the service should exist.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: xvs.lb.xvs_services
  - module: xvs.lb.xvs_destination
  - module: xvs.lb.xvs_attach
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: HTTP on a VIP, balanced over three web servers
  xvs.lb.xvs_service:
    address: 203.0.113.10
    port: 80
    destinations:
      - address: 192.0.2.21
      - address: 192.0.2.22
      - address: 192.0.2.23
        weight: 2
    purge_destinations: true

- name: A sticky UDP service
  xvs.lb.xvs_service:
    address: 203.0.113.10
    port: 53
    protocol: udp
    sticky: true

- name: Remove a service
  xvs.lb.xvs_service:
    address: 203.0.113.10
    port: 8080
    state: absent
'''

RETURN = r'''
moved:
  description: The share of each written service's Maglev table that moves, as RV(xvs.lb.xvs_services#module:moved).
  returned: always
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
service:
  description: The service after the run (null when absent).
  returned: always
  type: dict
  contains:
    address:
      description: The VIP.
      type: str
      sample: 203.0.113.10
    port:
      description: The port.
      type: int
      sample: 80
    protocol:
      description: The protocol.
      type: str
      sample: tcp
    sticky:
      description: Whether selection uses addresses only.
      type: bool
      sample: false
    forwarding:
      description: How destinations are reached (l2, ipip, gue); C(gue_port) is returned with gue.
      type: str
      sample: l2
    destinations:
      description:
        - The destinations, by address. For a tunnel, C(mac) is the next hop's and C(tunnel_source)
          and C(mtu) are added. C(state) is C(up), C(drained) or C(failing), as in M(xvs.lb.xvs_info).
      type: list
      elements: dict
      sample:
        - address: 192.0.2.21
          weight: 1
          state: up
          mac: "02:00:c0:00:02:15"
          interface: eth0
          vlan: 0
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _module, _planner, _spec


def main():
    module = AnsibleModule(
        argument_spec=dict(
            _spec.SERVICE_OPTIONS,
            sticky=dict(type="bool", default=_spec.DEFAULT_STICKY),
            forwarding=dict(type="str", default=_spec.DEFAULT_FORWARDING, choices=list(_spec.FORWARDING)),
            destinations=dict(type="list", elements="dict", options=dict(
                _spec.DESTINATION_OPTIONS, weight=dict(type="int", default=_spec.DEFAULT_WEIGHT))),
            purge_destinations=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            **_spec.COMMON_OPTIONS
        ),
        supports_check_mode=True,
    )
    p = module.params
    # the module's options are one entry of xvs_services' config
    entry = dict((k, p[k]) for k in _spec.SERVICE_OPTIONS)
    svc = _module.check(module, lambda: _spec.service("", entry))
    key = _spec.service_key(svc)
    entries = {key: svc}
    if p["state"] == "absent":
        state = "deleted"
    elif p["purge_destinations"] and p["destinations"] is not None:
        state = "replaced"
    else:
        state = "merged"
    r, service = _module.converge(module, _planner.transform(state, entries),
                                  _planner.labels(entries),
                                  lambda r, bal: _module.service_view(r, bal, key))
    _module.exit_with(module, r, key, service=service)


if __name__ == "__main__":
    main()
