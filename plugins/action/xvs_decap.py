# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Give xvs_decap the collection's decapsulating XDP program, and the boot
restore's library when library is set: what xvs_attach's action does for
the balancer's program."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.xvs.lb.plugins.action.xvs_attach import ActionModule as AttachAction


class ActionModule(AttachAction):
    MODULE = "xvs.lb.xvs_decap"
    PROGRAM = "xdp_decap.c"
