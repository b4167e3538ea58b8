# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    # Options every xvs.lb module takes.
    DOCUMENTATION = r'''
options:
  bpffs:
    description:
      - The directory on a mounted bpf filesystem where the program and its maps are pinned.
      - Every module of one balancer must use the same path.
      - Inside a network namespace entered with C(ip netns exec), C(/sys) is remounted, so use a
        bpffs mounted elsewhere (for example C(/run/xvs)).
    type: path
    default: /sys/fs/bpf/xvs
requirements:
  - Linux with XDP and a mounted bpf filesystem.
  - pyroute2 and, for M(xvs.lb.xvs_attach), bcc (C(python3-bpfcc)) for the target's Python.
notes:
  - Runs of xvs.lb modules on one host are serialised with the lock file C(/run/lock/xvs-lb.lock).
  - Only reading and writing the pinned maps is done without a compiler; only M(xvs.lb.xvs_attach)
    compiles.
'''

    # The state of record, kept by every module that changes the balancer.
    STATE_FILE = r'''
options:
  state_file:
    description:
      - The state of record, the desired state every changing run of M(xvs.lb.xvs_attach),
        M(xvs.lb.xvs_services), M(xvs.lb.xvs_service) and M(xvs.lb.xvs_destination) writes (atomically,
        mode C(0600)), and the boot restore of the P(xvs.lb.xvs#role) role applies.
      - One file belongs to one pin root (O(bpffs)). It records its bpffs, and a run with another
        bpffs is refused. Two balancers on one host (two pin roots) need two files; set both
        options once with C(module_defaults) for the action group C(group/xvs.lb.xvs).
    type: path
    default: /etc/xvs/state.json
'''

    # The identity of a service, shared by xvs_service and xvs_destination.
    PROTOCOL = r'''
options:
  protocol:
    description:
      - The service's layer-4 protocol.
    type: str
    choices: [tcp, udp]
    default: tcp
'''

    # xvs_services' and xvs_destination's wait for a drain to complete
    WAIT_DRAINED = r'''
options:
  wait_drained:
    description:
      - After the run, wait until every drained destination (desired weight 0) of the services the
        run was given holds at most O(wait_drained.max_flows) live flows, counted every second,
        or fail at O(wait_drained.timeout) naming each destination and its count (the run's change
        stays applied). Returned as RV(drained). Check mode does not wait.
      - A live flow is a flow record not idle for longer than its protocol's timeout (the
        O(xvs.lb.xvs_attach#module:sizes.tcp_timeout) or C(udp_timeout)); the balancer sees only
        the client's packets, so a connection that has ended counts until then. A destination
        removed from a service is not waited for (its flows select another destination at their
        next packet).
    type: dict
    suboptions:
      timeout:
        description: Seconds to wait at most.
        type: float
        default: 300
      max_flows:
        description: Live flows a drained destination may keep (0 waits for all to end).
        type: int
        default: 0
'''

    ATTRIBUTES = r'''
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in --diff mode).
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
'''
