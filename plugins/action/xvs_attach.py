# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Give xvs_attach the collection's XDP program when no source is set.

Ansible ships a module and its Python module_utils to the target, not the
collection's files/, so the C source goes along as a file in the task's
temporary directory, the way ansible.builtin.copy ships its src.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible.plugins.action import ActionBase

PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "files", "xdp_lb.c")


class ActionModule(ActionBase):

    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp  # tmp no longer has any effect
        args = dict(self._task.args)
        if args.get("state", "present") == "present" and not args.get("source"):
            if not self._connection._shell.tmpdir:
                self._make_tmp_path()
            remote = self._connection._shell.join_path(self._connection._shell.tmpdir, "xdp_lb.c")
            self._transfer_file(PROGRAM, remote)
            self._fixup_perms2((self._connection._shell.tmpdir, remote))
            args["source"] = remote
        try:
            result.update(self._execute_module(module_name="xvs.lb.xvs_attach", module_args=args,
                                               task_vars=task_vars))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result
