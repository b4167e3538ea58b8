#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
module: xvs_decap
short_description: Decapsulate an xvs.lb balancer's IPIP or GUE tunnels on a realserver with XDP
version_added: 0.3.0
description:
  - The realserver's end of a service with O(xvs.lb.xvs_services#module:config[].forwarding=ipip)
    or V(gue). Compiles a small XDP program (C(files/xdp_decap.c)) with bcc, pins it and its maps
    under O(bpffs) and attaches it to O(interfaces).
  - It removes the outer headers only of packets whose inner packet is addressed to one of O(vips)
    (and, with O(sources), whose outer source is one of them), and passes everything else
    untouched. The kernel then takes the inner packet as if it had arrived plain, so the VIPs
    must be on the host (the P(xvs.lb.realserver#role) role puts them on C(lo)).
  - Needs no ipip or fou kernel module and creates no tunnel device.
  - With the same options nothing is compiled and nothing changes; changed VIPs or sources are
    written to the maps of the running program.
extends_documentation_fragment:
  - xvs.lb.xvs.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: linux
  action:
    description: Has an action plugin, which copies the program (and O(library)) to the target.
    support: full
options:
  interfaces:
    description:
      - The interfaces tunnelled packets arrive on. Required with O(state=present).
      - An interface running another XDP program is refused.
    type: list
    elements: str
  decap:
    description:
      - The balancer services' forwarding methods to undo, V(ipip) (IPv4 in IPv4, protocol 4, and
        IPv6 in IPv6, next header 41), V(gue) (the IP packet directly in UDP to O(gue_port), GUE
        variant 1, over IPv4 or IPv6; the UDP checksum is not verified, the inner packet's own is),
        or both, for a backend of an ipip service and a gue service at once. A single method may
        be given as a string (the only form before 0.4.0). Required with O(state=present).
    type: list
    elements: str
    choices: [ipip, gue]
  gue_port:
    description:
      - The GUE UDP port, the balancer's O(xvs.lb.xvs_services#module:config[].gue_port).
    type: int
    default: 6080
  vips:
    description:
      - The VIPs whose tunnelled packets are decapsulated, IPv4 or IPv6 (at most 1024 of each).
    type: list
    elements: str
    default: []
  sources:
    description:
      - When given, only tunnelled packets from these outer sources (the balancers' tunnel source
        addresses) are decapsulated; others pass to the kernel untouched (at most 256).
    type: list
    elements: str
    default: []
  mode:
    description:
      - XDP mode; V(auto) uses native where the driver supports it, else generic.
    type: str
    choices: [auto, native, generic]
    default: auto
  bpffs:
    description:
      - The directory on a mounted bpf filesystem where the program and its maps are pinned.
    type: path
    default: /sys/fs/bpf/xvs-decap
  config_file:
    description:
      - Where the options are kept (mode C(0600)) for the boot restore, C(xvs-decap), which the
        P(xvs.lb.realserver#role) role runs at boot.
    type: path
    default: /etc/xvs/decap.json
  library:
    description:
      - Where to keep the boot restore's library (the collection's control-plane code and
        programs, one zip), written only when it differs.
    type: path
  library_source:
    description:
      - Set by the action plugin.
    type: path
  source:
    description:
      - The program's C source on the target; without it the collection's is copied there.
    type: path
  state:
    description:
      - V(absent) detaches the program from every interface, unpins it and removes O(config_file).
    type: str
    choices: [present, absent]
    default: present
author:
  - xvs.lb contributors (@xvs-lb)
notes:
  - Runs on one host are serialised with the lock file C(/run/lock/xvs-lb.lock).
requirements:
  - Linux with XDP and a mounted bpf filesystem; bcc (C(python3-bpfcc)) and pyroute2.
'''

EXAMPLES = r'''
- name: Decapsulate the balancer's GUE tunnel for two VIPs
  xvs.lb.xvs_decap:
    interfaces: [eth0]
    decap: gue
    vips: [203.0.113.10, 203.0.113.11]
    sources: [192.0.2.2, 192.0.2.3]
'''

RETURN = r'''
interfaces:
  description: The interfaces running the program, and the XDP mode of each.
  returned: always
  type: dict
  sample: {eth0: native}
counters:
  description:
    - Packets decapsulated (C(decap_ipip), C(decap_gue)), and tunnelled packets passed untouched
      because their inner destination is no configured VIP (C(not_vip)) or their outer source no
      configured source (C(not_source)); null when nothing is pinned.
  returned: always
  type: dict
  sample: {decap_ipip: 0, decap_gue: 1042, not_vip: 0, not_source: 0}
bpffs:
  description: The pin root of the decapsulator's program and maps.
  returned: always
  type: str
  sample: /sys/fs/bpf/xvs-decap
'''

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.xvs.lb.plugins.module_utils import _decap, _loader, _module, _spec, _state


def main():
    module = AnsibleModule(
        argument_spec=dict(
            interfaces=dict(type="list", elements="str"),
            decap=dict(type="list", elements="str", choices=list(_decap.METHODS)),
            gue_port=dict(type="int", default=_spec.DEFAULT_GUE_PORT),
            vips=dict(type="list", elements="str", default=[]),
            sources=dict(type="list", elements="str", default=[]),
            mode=dict(type="str", default="auto", choices=list(_loader.MODES)),
            bpffs=dict(type="path", default=_decap.DEFAULT_BPFFS),
            config_file=dict(type="path", default=_decap.DEFAULT_CONFIG_FILE),
            library=dict(type="path"),
            library_source=dict(type="path"),
            source=dict(type="path"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        required_if=[("state", "present", ["interfaces", "decap"])],
        required_by={"library": "library_source"},
        supports_check_mode=True,
    )
    p = module.params

    def absent():
        root = _spec.bpffs(p["bpffs"])
        changed = bool(_loader.pinned_prog_id(root)) or os.path.exists(p["config_file"])
        if not module.check_mode:
            changed = _decap.remove(root, p["config_file"]) or changed
        return {"changed": changed, "interfaces": {}, "counters": None}

    def present():
        cfg = _decap.normalise(p)
        plan = _decap.DecapPlan(cfg, _loader.read_source(p["source"] or _decap.default_source()))
        boot = _decap.config_bytes(cfg)
        files = [(p["config_file"], boot)]
        if p["library"]:
            files.append((p["library"], _loader.read_source_bytes(p["library_source"])))
        stale = [(path, data) for path, data in files if not _state.same_content(path, data)]
        if not module.check_mode:
            plan.apply()
            for path, data in stale:
                _state.replace_file(path, data)
        return dict(plan.result(), changed=plan.changed or bool(stale))

    result = _module.run(module, present if p["state"] == "present" else absent)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
