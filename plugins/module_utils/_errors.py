# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The error policy: an XvsError (or any of its subclasses, one per layer:
SizeError, BpfError, DataPlaneError, LoaderError, NetInfoError) is a
problem the user fixes, reported as one line naming the option and the
value, with nothing changed; every entry point (the modules, the boot
restore, xvs-agent) catches XvsError and nothing else.  Any other
exception is a bug, and its traceback is what to report."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class XvsError(Exception):
    """A problem the user fixes: reported as one line, nothing changed."""
