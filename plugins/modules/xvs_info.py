#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_info
short_description: Read the state and counters of the xvs.lb XDP load balancer
version_added: 0.1.0
description:
  - Returns the attachment (interfaces, modes, program, sizes), every service with its
    destinations, and the counters, read from the pinned maps. Changes nothing and needs no
    compiler.
  - On a host where nothing is attached at O(bpffs) it does not fail; it returns
    RV(attached=false) and empty results, as other C(_info) modules report absence.
  - Also returns the desired services from O(state_file), the state of record (what
    M(xvs.lb.xvs_services) with O(xvs.lb.xvs_services#module:state=gathered) returns).
options:
  source_prefixes:
    description:
      - How many of the busiest client source prefixes (IPv4 /20s, IPv6 /48s) to return in
        RV(source_prefixes), by forwarded packets since the maps were made. IPv6 /48s share 65,536
        slots by a hash; where two sending /48s share one, the busier keeps it and its count is
        lowered by the other's packets.
      - V(0) reads none; a negative number is an error. Reading them is one batch read of each whole per-CPU prefix array
        (9 MiB per CPU), so ask only when you want them.
    type: int
    default: 0
extends_documentation_fragment:
  - xvs.lb.xvs
  - xvs.lb.xvs.state_file
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
    details: Reads only; the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: linux
seealso:
  - module: xvs.lb.xvs_attach
  - module: xvs.lb.xvs_services
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: Read the balancer
  xvs.lb.xvs_info:
  register: lb

- name: Which client networks send the most
  xvs.lb.xvs_info:
    source_prefixes: 10
  register: lb

- name: Show new flows per destination
  ansible.builtin.debug:
    msg: "{{ item.address }}: {{ item.counters.new_flows }}"
  loop: "{{ lb.services | map(attribute='destinations') | flatten }}"
'''

RETURN = r'''
attached:
  description:
    - Whether a program is pinned at O(bpffs). When it is not, RV(attachment), RV(counters) and
      RV(flow_table) are null and RV(services), RV(source_prefixes) and RV(unresolved) are empty
      lists, rather than the module failing; RV(desired) and RV(failing) are still read.
  returned: always
  type: bool
  sample: true
desired:
  description: The desired services, in the config shape of M(xvs.lb.xvs_services).
  returned: always
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
attachment:
  description: Where and how the program runs; null when RV(attached) is false.
  returned: success
  type: dict
  contains:
    interfaces:
      description: Attached interfaces and their XDP mode.
      type: dict
      sample: {"eth0": "native"}
    program:
      description: The kernel's program id, tag and name.
      type: dict
      sample: {"id": 42, "tag": "298628d272f25179", "name": "xdp_lb"}
    sizes:
      description: The sizes the program was loaded with (as RV(xvs.lb.xvs_attach#module:sizes)).
      type: dict
      sample: {"flow_table_size": 1048576, "flow_table_size_v6": 262144, "max_services": 64,
               "max_destinations": 256, "maglev_table_size": 65537, "tcp_timeout": 300, "udp_timeout": 60,
               "max_interfaces": 64}
    vlans:
      description: VLAN id to prefix, for a trunk.
      type: dict
      sample: {}
    tunnel_source:
      description: The tunnels' outer source address per family, where O(xvs.lb.xvs_attach#module:tunnel_source) set one.
      type: dict
      sample: {}
    bpffs:
      description: The pin root.
      type: str
      sample: /sys/fs/bpf/xvs
services:
  description:
    - Every service, its destinations, and their counters (packets, bytes, new flows).
    - C(forwarding) is the service's method (l2, ipip, gue; C(gue_port) with gue). A tunnelled
      service's destinations add C(tunnel_source) and C(mtu), and their C(mac) is the next hop's.
    - A destination's C(state) is C(up); C(drained), weight 0, where no new connection goes and
      established ones continue; or C(failing), where its health check failed, weight 0, and every
      packet of its flows selects another destination. Desired destinations the maps do not hold are
      in RV(unresolved).
    - C(active_flows) counts a destination's live flow records, those not idle past their
      protocol's timeout; they are its connections, and what a drain waits for (see
      O(xvs.lb.xvs_destination#module:wait_drained)).
    - C(digest) is a SHA-256 of the service's live Maglev table as addresses, not as the slots a
      balancer holds them in. Balancers behind ECMP with the same destinations and weights show the
      same digest, so a flow that moves between them keeps its destination.
  returned: success
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      sticky: false
      forwarding: l2
      counters: {"packets": 10, "bytes": 1200, "new_flows": 2}
      digest: 5d4f0c1e3a9b2c7d8e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d
      destinations:
        - address: 192.0.2.21
          weight: 1
          state: up
          active_flows: 2
          mac: "02:00:c0:00:02:15"
          interface: eth0
          vlan: 0
          counters: {"packets": 10, "bytes": 1200, "new_flows": 2}
counters:
  description:
    - Global counters, summed over CPUs. C(rx_packets) equals the sum of C(pass), C(tx),
      C(redirect), C(icmp_echo_reply), C(icmp_too_big) and the C(drop_*) reasons.
    - C(encap_ipip) and C(encap_gue) count tunnelled frames (within C(tx) and C(redirect));
      C(icmp_too_big) the fragmentation-needed replies to frames too big to tunnel.
  returned: success
  type: dict
  sample: {"rx_packets": 12, "rx_bytes": 868, "pass": 9, "tx": 3, "redirect": 0,
           "drop_no_service": 0, "drop_no_dest": 0, "drop_fragment": 0, "drop_icmp": 0,
           "drop_vlan": 0, "icmp_echo_reply": 0, "icmp_ptb_forwarded": 0, "new_flows": 1,
           "flow_reselect": 0, "encap_ipip": 0, "encap_gue": 0, "icmp_too_big": 0, "drop_encap": 0,
           "drop_ipv6_ext": 0}
source_prefixes:
  description:
    - The O(source_prefixes) busiest client source prefixes (IPv4 /20s, IPv6 /48s), busiest first,
      with the VIP packets each sent that were forwarded. Empty unless O(source_prefixes) is above 0.
  returned: success
  type: list
  elements: dict
  sample:
    - prefix: 198.51.96.0/20
      packets: 1200
maintenance:
  description:
    - The balancer's maintenance (M(xvs.lb.xvs_maintenance)) as the state of record keeps it, and what
      xvs-agent last said of its announcements.
  returned: success
  type: dict
  contains:
    in_maintenance:
      description: Whether the record has the balancer out for maintenance.
      type: bool
    since:
      description: When it went into maintenance (Unix time); null in service.
      type: float
    drain_timeout:
      description: The drain's timeout in seconds; null in service.
      type: float
    drain_rate:
      description: The new-flow rate that ends the drain; null in service.
      type: float
    agent:
      description:
        - What the agent last wrote; null where no agent announces VIPs (no BGP).
      type: dict
      contains:
        maintenance:
          description: C(draining), C(withdrawn), or null in service.
          type: str
        announced:
          description: The VIPs announced, each C(announced) or C(draining) (GRACEFUL_SHUTDOWN).
          type: dict
failing:
  description:
    - The destinations xvs-agent's health checks found failing (see O(xvs.lb.xvs_services#module:config[].check)),
      which the maps hold with weight 0 while their desired weight stays as recorded. Empty when no
      agent runs or every check passes.
  returned: success
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      destination: 192.0.2.22
      reason: Connection refused (port 80)
unresolved:
  description:
    - The destinations in the state of record that the maps do not hold, because their MAC (or
      their tunnel's next hop's) did not resolve, as for a backend still booting or one that is off.
      They get no traffic; xvs-agent adds each as soon as it answers, and any run of the service
      modules tries again.
  returned: success
  type: list
  elements: dict
  sample:
    - address: 203.0.113.10
      port: 80
      protocol: tcp
      destination: 192.0.2.24
flow_table:
  description:
    - The flow tables' C(capacity) (C(flow_table_size) plus C(flow_table_size_v6), the IPv4 and the
      IPv6 table together), their live C(entries), and how many records the kernel C(evicted) to
      make room (least recently used first) since the maps were made. A flow whose record was
      evicted selects its destination again with its next packet, by the same Maglev table, so it keeps its destination unless the destinations changed.
    - C(flow_reselect) in C(counters) counts records replaced (idle past the timeout, or their
      destination removed); evictions are new flows minus replaced records minus live entries.
    - C(families) gives C(capacity) and C(entries) per table, C(ipv4) and C(ipv6), so that a full
      IPv6 table shows beside an empty IPv4 one. Evictions are counted for both tables together.
  returned: success
  type: dict
  sample: {"capacity": 1310720, "entries": 2, "evicted": 0,
           "families": {"ipv4": {"capacity": 1048576, "entries": 2}, "ipv6": {"capacity": 262144, "entries": 0}}}
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import (_balancer, _health, _loader, _maintenance, _module, _planner,
                                                             _spec, _state)
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError


def main():
    module = AnsibleModule(argument_spec=dict(_spec.COMMON_OPTIONS, source_prefixes=dict(type="int", default=0)),
                           supports_check_mode=True)
    p = module.params

    def work():
        if p["source_prefixes"] < 0:
            raise XvsError("source_prefixes=%d: must be 0 or more" % p["source_prefixes"])
        down = _health.load(p["state_file"])
        failing = [{"address": k[0], "port": k[1], "protocol": k[2], "destination": a, "reason": r}
                   for k in sorted(down) for a, r in sorted(down[k].items())]
        if not _loader.is_pinned(_spec.bpffs(p["bpffs"])):
            # as other *_info modules report absence: attached false, nothing read
            record = _state.load(p["state_file"], p["bpffs"])
            desired = _planner.from_config(record["services"], p["state_file"]) if record else {}
            return dict(UNATTACHED, desired=_planner.to_config(desired), failing=failing,
                        maintenance=_maintenance.view(p["state_file"], p["bpffs"]))
        # under the lock: a consistent read, no run half-way through a change
        with _balancer.Balancer(p["bpffs"]) as bal:
            result = _balancer.info(bal, p["source_prefixes"])
            desired = _planner.recorded(bal, p["state_file"])[1]
            result.update(attached=True, desired=_planner.to_config(desired), failing=failing,
                          maintenance=_maintenance.view(p["state_file"], p["bpffs"]))
            result["unresolved"] = [{"address": k[0], "port": k[1], "protocol": k[2], "destination": a}
                                    for k, a in _planner.unresolved(desired, bal.dp.services())]
            return result
    module.exit_json(changed=False, **_module.run(module, work))


# what a host with nothing attached at bpffs returns besides desired and failing
UNATTACHED = {"attached": False, "attachment": None, "services": [], "counters": None, "flow_table": None,
              "source_prefixes": [], "unresolved": []}


if __name__ == "__main__":
    main()
