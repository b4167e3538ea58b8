#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_services
short_description: Manage all virtual services of the xvs.lb XDP load balancer in one run
version_added: 0.2.0
description:
  - A resource module in the shape of the network collections' ones (O(config) and O(state)) for
    the services (VIP, port, protocol) of the balancer attached with M(xvs.lb.xvs_attach) and
    their destinations.
  - One run takes the host lock once, reads the maps once, checks the whole O(config) before
    anything is written, and writes only the services that differ; a Maglev table is built only
    for a service whose eligible destinations or weights change.
  - Every changing run records the resulting desired state in O(state_file), the state of record
    that the xvs role's boot restore applies, so changes made by any module survive a reboot.
  - Destinations are resolved on the balancer to the attached interface (or trunk VLAN) they are
    on-link through and to their MAC address (from the neighbour table, probing once), unless a
    MAC address is given.
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.state_file
  - xvs.lb.xvs.wait_drained
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: linux
options:
  config:
    description:
      - The services.
      - With O(state=merged), options left out keep their current values (a new service takes the
        defaults); with O(state=replaced) and O(state=overridden) they take the defaults.
      - With O(state=deleted) only address, port and protocol are read.
    type: list
    elements: dict
    suboptions:
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
      protocol:
        description:
          - The service's layer-4 protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      sticky:
        description:
          - Select destinations by client and VIP address only, so every connection of one client
            goes to the same destination, and fragments of the service's traffic can be forwarded.
          - Default V(false).
        type: bool
      destinations:
        description:
          - The service's destinations (real servers).
          - With O(state=merged), destinations not listed are kept; with O(state=replaced) and
            O(state=overridden) the service ends with exactly these.
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
              - Share of new flows, relative to the service's other destinations, 0 to 65535; 0
                drains (no new flows, established flows continue).
              - Default V(1).
            type: int
          mac:
            description:
              - The destination's MAC address (for a tunnel, its next hop's), instead of resolving it. Required for destinations
                on a VLAN of a trunk, which the balancer cannot probe.
            type: str
      check:
        description:
          - The health check the balancer's xvs-agent (installed by the xvs role) runs against each
            destination's own address. A destination that fails O(config[].check.fall) checks in a row gets
            effective weight 0 (no new flows; established flows continue) until it passes O(config[].check.rise)
            in a row; its desired weight, the state of record, is never changed by health.
          - Without a check a destination counts as healthy. With O(state=merged) a given check
            replaces the current one whole; O(state=replaced) or O(state=overridden) without it removes it.
        type: dict
        suboptions:
          type:
            description:
              - V(tcp) connects; V(http) and V(https) GET O(config[].check.path) and expect O(config[].check.expect_status)
                (https does not verify the certificate); V(exec) runs O(config[].check.command) on the balancer.
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
              - Seconds a check may take before it counts as failed, 0.1 to O(config[].check.interval).
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
            outer IPv4 and UDP header (GUE variant 1, to O(config[].gue_port)). Destinations may be anywhere
            the balancer routes to through an attached interface; the next hop is the kernel's route
            to each destination, the outer source the route's source address (the balancer's address
            on that interface) or O(xvs.lb.xvs_attach#module:tunnel_source). A packet that would not
            fit the egress MTU once encapsulated is answered with an ICMP fragmentation-needed. The realservers must decapsulate
            (the P(xvs.lb.realserver#role) role's C(realserver_decap)).
          - For an IPv6 service, V(ipip) is IPv6-in-IPv6 (next header 41) and V(gue) GUE over IPv6, whose UDP
            checksum the balancer sums over the datagram.
          - Default V(l2) for a new service; with O(state=merged) a service left without it keeps its own.
        type: str
        choices: [l2, ipip, gue]
      gue_port:
        description:
          - With O(config[].forwarding=gue), the UDP port the realservers decapsulate GUE on. Default V(6080).
          - The UDP source port is taken from the flow's hash, so ECMP and RSS on the way spread flows.
        type: int
      min_healthy:
        description:
          - The service is down, as xvs-agent reports it (metric C(xvs_service_up)), while fewer of its
            destinations than this are healthy with a desired weight above 0. Default V(1).
        type: int
  state:
    description:
      - V(merged) creates or updates the listed services and sets their listed destinations;
        nothing else is touched.
      - V(replaced) makes each listed service exactly as given; unlisted services are untouched.
      - V(overridden) leaves the balancer with exactly the listed services.
      - V(deleted) removes the listed services; with no O(config), every service.
      - V(gathered) changes nothing and returns the services in the O(config) shape as RV(gathered);
        fed back as O(config) with O(state=overridden), it is a run that changes nothing.
    type: str
    choices: [merged, replaced, overridden, deleted, gathered]
    default: merged
notes:
  - The desired state is read from O(state_file) when it exists; on a balancer that has none yet
    (attached before there was one), from the maps, and the first run writes the file.
  - RV(before), RV(after) and RV(gathered) are the desired state, what the state of record holds;
    M(xvs.lb.xvs_info) shows the maps with the resolved MAC, interface and VLAN of each destination.
seealso:
  - module: xvs.lb.xvs_service
  - module: xvs.lb.xvs_destination
  - module: xvs.lb.xvs_info
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: Add or update two services, keep everything else
  xvs.lb.xvs_services:
    config:
      - address: 203.0.113.10
        port: 80
        destinations:
          - address: 192.0.2.21
          - address: 192.0.2.22
            weight: 2
      - address: 203.0.113.10
        port: 53
        protocol: udp
        sticky: true
        destinations:
          - address: 192.0.2.21
    state: merged

- name: The balancer ends with exactly these services
  xvs.lb.xvs_services:
    config:
      - address: 203.0.113.10
        port: 80
        destinations:
          - address: 192.0.2.21
    state: overridden

- name: Read the services in the config shape
  xvs.lb.xvs_services:
    state: gathered
  register: xvs_now

- name: Remove every service
  xvs.lb.xvs_services:
    state: deleted

- name: Set bpffs and state_file once for every xvs.lb module
  module_defaults:
    group/xvs.lb.xvs:
      bpffs: /run/xvs/bpffs/lb
      state_file: /etc/xvs/lb.json
  block:
    - name: Drain one destination
      xvs.lb.xvs_services:
        config:
          - address: 203.0.113.10
            port: 80
            destinations:
              - address: 192.0.2.21
                weight: 0
'''

RETURN = r'''
moved:
  description:
    - For each service the run writes (check mode too), the share of its Maglev table whose
      destination changes (0 to 1; 1 for a new service). It is the share of new flows that go
      somewhere else than they would have, and of existing flows that would go elsewhere once their
      flow record is gone (evicted, or at another balancer after an ECMP failover). C(--diff) shows
      it too.
  returned: when O(state) is not V(gathered)
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      moved: 0.249
drained:
  description: The live flows of each drained destination when O(wait_drained) ended.
  returned: when O(wait_drained) is given, not in check mode
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      destination: 192.0.2.22
      active_flows: 0
unresolved:
  description:
    - Destinations of the desired state that the maps do not hold because their MAC (or their
      tunnel's next hop's) did not answer within the run's one shared wait (3 s), each also a
      warning. Only a destination that this run adds must resolve (else the run fails and changes
      nothing); one that was desired already (a backend that is off, for example drained for
      maintenance) stays desired and is added when it answers (by xvs-agent, or the next run).
  returned: when O(state) is not V(gathered)
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      destination: 192.0.2.24
      reason: "service 203.0.113.10:80/tcp destination=192.0.2.24: cannot resolve the MAC address of 192.0.2.24 on eth0 (no ARP reply within 3s)"
before:
  description: The services before the run, in the O(config) shape.
  returned: when O(state) is not V(gathered)
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      sticky: false
      destinations:
        - address: 192.0.2.21
          weight: 1
after:
  description: The services after the run (in check mode, as the run would leave them), in the
    O(config) shape.
  returned: when changed
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      sticky: false
      destinations:
        - address: 192.0.2.21
          weight: 0
gathered:
  description: The services, in the O(config) shape.
  returned: when O(state=gathered)
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      sticky: false
      destinations:
        - address: 192.0.2.21
          weight: 1
          mac: "02:00:c0:00:02:15"
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _module, _planner, _spec


def main():
    module = AnsibleModule(
        argument_spec=dict(
            config=dict(type="list", elements="dict", options=_spec.SERVICE_OPTIONS),
            state=dict(type="str", default="merged", choices=list(_planner.STATES) + ["gathered"]),
            wait_drained=dict(type="dict", options=_module.WAIT_DRAINED_OPTIONS),
            **_spec.COMMON_OPTIONS
        ),
        required_if=[("state", "merged", ["config"]), ("state", "replaced", ["config"])],
        supports_check_mode=True,
    )
    p = module.params
    entries = _module.check(module, lambda: _spec.services(p["config"] or []))
    if p["state"] == "gathered":
        module.exit_json(changed=False, gathered=_planner.to_config(_module.gather(module)))
    _module.check_wait_drained(module)
    r, dummy = _module.converge(module, _planner.transform(p["state"], entries),
                                _planner.labels(entries))
    diff = r.plan.diff()
    # after only with a change, as the network collections' resource modules
    # do: a no-change run over a thousand services returns half the data
    result = {"after": diff["after"]["config"]} if r.changed else {}
    drained = _module.wait_drained(module, r, dict((key, None) for key in entries))
    if drained is not None:
        result["drained"] = drained
    _module.exit_with(module, r, before=diff["before"]["config"], **result)


if __name__ == "__main__":
    main()
