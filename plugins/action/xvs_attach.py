# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Give xvs_attach the collection's XDP program when no source is set, and
the boot restore's library when library is set.

Ansible ships a module and its Python module_utils to the target, not the
collection's files/, so the C source goes along as a file in the task's
temporary directory, the way ansible.builtin.copy ships its src.  The
restore's library (the control-plane code and the program, one zip that
Python imports from) goes along the same way, in this one task: the module
rewrites it only when it differs, so an unchanged library costs one file
transfer, not a copy task per file.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os
import zipfile

from ansible.plugins.action import ActionBase

COLLECTION = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the XDP programs, in the library for the boot restores (xvs-restore, xvs-decap)
PROGRAMS = ("xdp_decap.c", "xdp_lb.c")
# the library's layout: what the restore puts on sys.path
PREFIX = "ansible_collections/xvs/lb/"
PACKAGES = ("ansible_collections/", "ansible_collections/xvs/", PREFIX, PREFIX + "plugins/",
            PREFIX + "plugins/module_utils/")


def library(root=COLLECTION):
    """The restore's library as zip bytes: the same bytes for the same
    files (fixed times and order), so the target can compare, not copy."""
    members = [("plugins/module_utils/" + name, os.path.join(root, "plugins", "module_utils", name))
               for name in sorted(os.listdir(os.path.join(root, "plugins", "module_utils")))
               if name.endswith(".py")]
    members += [("files/" + name, os.path.join(root, "files", name)) for name in PROGRAMS]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for package in PACKAGES:      # zipimport finds only packages with an __init__
            z.writestr(zipfile.ZipInfo(package + "__init__.py", (1980, 1, 1, 0, 0, 0)), "")
        for name, path in members:
            info = zipfile.ZipInfo(PREFIX + name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                z.writestr(info, f.read())
    return out.getvalue()


class ActionModule(ActionBase):

    TRANSFERS_FILES = True
    MODULE = "xvs.lb.xvs_attach"
    PROGRAM = "xdp_lb.c"        # shipped as source unless the task gives one

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp  # tmp no longer has any effect
        args = dict(self._task.args)
        present = args.get("state", "present") == "present"
        if present and (not args.get("source") or args.get("library")):
            if not self._connection._shell.tmpdir:
                self._make_tmp_path()
        tmpdir = self._connection._shell.tmpdir
        try:
            if present and not args.get("source"):
                remote = self._connection._shell.join_path(tmpdir, self.PROGRAM)
                self._transfer_file(os.path.join(COLLECTION, "files", self.PROGRAM), remote)
                self._fixup_perms2((tmpdir, remote))
                args["source"] = remote
            if present and args.get("library"):
                remote = self._connection._shell.join_path(tmpdir, "xvs-lb.zip")
                self._transfer_data(remote, library())
                self._fixup_perms2((tmpdir, remote))
                args["library_source"] = remote
            result.update(self._execute_module(module_name=self.MODULE, module_args=args,
                                               task_vars=task_vars))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result
