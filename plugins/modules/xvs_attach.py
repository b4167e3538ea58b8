#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_attach
short_description: Load the xvs.lb XDP load balancer and attach it to interfaces
version_added: 0.1.0
description:
  - Compiles the XDP program with bcc, with the table sizes given, pins it and its maps under
    O(bpffs), and attaches it to O(interfaces).
  - With the same options on an attached host nothing is compiled and nothing changes. A new
    program version or changed options reload it; services, destinations, counters and live
    flows are kept.
  - Changing sizes re-creates the maps and copies the configuration over; live flows then
    select their destination again and counters restart, so it is refused unless
    O(allow_flow_table_reset=true).
  - Without O(source) the collection's own program (C(files/xdp_lb.c)) is copied to the target
    by the action plugin and used.
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
  action:
    description: Indicates this has a corresponding action plugin, so some parts of the options
      can be executed on the controller.
    support: full
options:
  interfaces:
    description:
      - The interfaces to attach to. Required with O(state=present); the program ends attached
        to exactly these, and detached from other interfaces it ran on.
      - With O(state=absent), the interfaces to detach from; all when omitted.
    type: list
    elements: str
  mode:
    description:
      - C(native) runs in the driver, C(generic) in the kernel's generic XDP path (works on any
        interface, slower), C(auto) native where the driver supports it, else generic.
      - The mode used is returned per interface.
    type: str
    choices: [auto, native, generic]
    default: auto
  sizes:
    description:
      - Table sizes and timeouts, fixed when the program is loaded.
    type: dict
    suboptions:
      flow_table_size:
        description:
          - Entries in the IPv4 flow table (an LRU hash). 96 bytes each by the kernel's count,
            preallocated; the default takes 96 MiB.
        type: int
        default: 1048576
      flow_table_size_v6:
        description:
          - Entries in the IPv6 flow table, a second LRU hash with 16-byte addresses in its keys.
            136 bytes each, preallocated; the default takes 34 MiB. Where no service is IPv6, the
            minimum (1024) saves that memory.
        type: int
        default: 262144
      max_services:
        description:
          - Services the balancer can hold. Each takes two Maglev tables of about 131 KB at
            the default table size (16.8 MB for the default 64 services).
        type: int
        default: 64
      max_destinations:
        description:
          - Destinations per service (up to 65535).
        type: int
        default: 256
      maglev_table_size:
        description:
          - Slots in each service's Maglev table, a prime larger than O(sizes.max_destinations)
            (ideally 100 times larger, for even shares).
        type: int
        default: 65537
      tcp_timeout:
        description:
          - Seconds a TCP flow may idle before it selects its destination again.
        type: int
        default: 300
      udp_timeout:
        description:
          - Seconds a UDP flow may idle before it selects its destination again.
        type: int
        default: 60
      max_interfaces:
        description:
          - Interfaces that can be redirect targets between attached interfaces.
        type: int
        default: 64
  vlans:
    description:
      - For an 802.1Q trunk (the first of O(interfaces)), the balancer's prefix on each VLAN,
        by VLAN id. Destinations in these prefixes are reached through the trunk with that
        VLAN id.
    type: dict
  tunnel_source:
    description:
      - The outer source address of tunnels (services with
        O(xvs.lb.xvs_services#module:config[].forwarding=ipip) or V(gue)), per family. By default each
        tunnel takes the source address of the balancer's route to its destination, its address on
        the egress interface.
      - Every run of M(xvs.lb.xvs_services), M(xvs.lb.xvs_service) and M(xvs.lb.xvs_destination) moves
        the tunnels of the services it plans to the source in force.
    type: dict
    suboptions:
      ipv4:
        description:
          - For IPv4 tunnels.
        type: str
      ipv6:
        description:
          - For IPv6 tunnels (IPv6-in-IPv6).
        type: str
  source:
    description:
      - Path on the target of a program to load instead of the collection's own.
    type: path
  library:
    description:
      - Also keep, at this path on the target, the library the boot restore runs (the collection's
        control-plane code and XDP program in one zip that Python imports from). It is rewritten,
        atomically and root-only, only when it differs. The P(xvs.lb.xvs#role) role sets it.
    type: path
  library_source:
    description:
      - Where the action plugin put this run's library on the target; set by the action plugin
        when O(library) is given, not by playbooks.
    type: path
  allow_flow_table_reset:
    description:
      - Allow a size change, which re-creates the maps (the configuration is copied over; live
        flows select again and counters restart).
    type: bool
    default: false
  allow_layout_upgrade:
    description:
      - Allow an upgrade across a data-plane layout change. Without it, maps pinned by a program of
        another layout (another data-plane ABI) are refused with the way on.
      - With it, the old pins are set aside (the old program keeps serving), the new program is
        loaded with new maps, attached in place of the old one, and every service of the state of
        record (O(state_file)) is put back, in one run; the old pins are then removed. If a step
        fails, the old program is put back where it ran. Only this balancer's flow table (and its
        counters) is lost, so take the balancer out of the fleet first (M(xvs.lb.xvs_maintenance)).
      - Needs a state of record; with maps of the current layout it changes nothing.
    type: bool
    default: false
    version_added: 0.4.0
  state:
    description:
      - C(present) loads and attaches; C(absent) detaches, and removes every pin once the
        program is attached nowhere.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: xvs.lb.xvs_service
  - module: xvs.lb.xvs_info
author:
  - xvs.lb contributors (@xvs-lb)
'''

EXAMPLES = r'''
- name: Attach the balancer to eth0
  xvs.lb.xvs_attach:
    interfaces: [eth0]

- name: A trunk with two VLANs, a smaller flow table, in generic mode
  xvs.lb.xvs_attach:
    interfaces: [eth1]
    mode: generic
    vlans:
      10: 192.0.2.0/24
      20: 198.51.100.0/24
    sizes:
      flow_table_size: 262144

- name: Detach everywhere and remove the pins
  xvs.lb.xvs_attach:
    state: absent
'''

RETURN = r'''
program:
  description: The loaded program (null once removed).
  returned: always
  type: dict
  contains:
    id:
      description: The kernel's program id.
      type: int
      sample: 42
    tag:
      description: The kernel's program tag (a hash of its instructions).
      type: str
      sample: 298628d272f25179
    name:
      description: The program's name in the kernel (its entry function, as bpftool shows it).
      type: str
      sample: xdp_lb
interfaces:
  description: The interfaces the program is attached to, with the XDP mode of each.
  returned: always
  type: dict
  sample: {"eth0": "native"}
bpffs:
  description: The pin root.
  returned: always
  type: str
  sample: /sys/fs/bpf/xvs
sizes:
  description: The sizes the program was loaded with.
  returned: always
  type: dict
  sample: {"flow_table_size": 1048576, "flow_table_size_v6": 262144, "max_services": 64,
           "max_destinations": 256, "maglev_table_size": 65537, "tcp_timeout": 300, "udp_timeout": 60,
           "max_interfaces": 64}
vlans:
  description: VLAN id to prefix, for a trunk.
  returned: always
  type: dict
  sample: {}
tunnel_source:
  description: The tunnels' outer source address per family, where one is set.
  returned: always
  type: dict
  sample: {"ipv4": "192.0.2.2"}
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _layout as L, _loader, _module, _spec, _state
from ansible_collections.xvs.lb.plugins.module_utils._attach import AttachPlan, AttachRun

# defaults and limits live in _layout.SIZE_LIMITS
SIZE_OPTIONS = dict((name, dict(type="int", default=limits[0]))
                    for name, limits in L.SIZE_LIMITS.items())


def main():
    module = AnsibleModule(
        argument_spec=dict(
            interfaces=dict(type="list", elements="str"),
            mode=dict(type="str", default="auto", choices=list(_loader.MODES)),
            sizes=dict(type="dict", options=SIZE_OPTIONS),
            vlans=dict(type="dict"),
            tunnel_source=dict(type="dict", options=dict(ipv4=dict(type="str"), ipv6=dict(type="str"))),
            source=dict(type="path"),
            library=dict(type="path"),
            library_source=dict(type="path"),
            allow_flow_table_reset=dict(type="bool", default=False),
            allow_layout_upgrade=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            **_spec.COMMON_OPTIONS
        ),
        required_if=[("state", "present", ["interfaces"])],
        required_by={"library": "library_source"},
        supports_check_mode=True,
    )
    params = module.params

    def work():
        text = _loader.read_source(params["source"]) if params["state"] == "present" else ""
        r = AttachRun(AttachPlan(params, text, module.check_mode), params["state_file"])
        for line in r.plan.warnings:
            module.warn(line)
        plan = r.plan
        library, stale = None, False
        if params["library"] and params["state"] == "present":
            library = _loader.read_source_bytes(params["library_source"])
            stale = not _state.same_content(params["library"], library)
            r.changed = r.changed or stale
        if module.check_mode:
            return r, dict(plan.after or {}, program=plan.status["program"] if plan.status else None)
        r.apply()
        if stale:
            _state.replace_file(params["library"], library)
        return r, plan.result()

    r, result = _module.run(module, work)
    p = r.plan
    result.setdefault("interfaces", {})
    result.setdefault("bpffs", p.root)
    result.setdefault("sizes", p.sizes)
    result.setdefault("vlans", p.vlans)
    result.setdefault("tunnel_source", p.tunnel_source)
    result.pop("build_id", None)
    result["changed"] = r.changed
    if module._diff:
        result["diff"] = {"before": p.before, "after": p.after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
