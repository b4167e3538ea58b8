# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The daemons' log lines (xvs-agent, xvs-restore): each written and
flushed when it happens, with its syslog priority.

Under systemd the unit's stdout and stderr are a stream to journald, which
names it in $JOURNAL_STREAM (systemd.exec(5)); journald reads a leading
"<N>" as the line's priority (sd-daemon(3)) and the unit's
SyslogIdentifier names the program, so `journalctl -p warning` finds a
destination that went down.  Anywhere else (a terminal, a file, another
service manager) each line carries a timestamp and the priority's name.
The standard library's logging would add handlers and levels for one
prefix; this is the prefix.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import os
import sys

# syslog priorities (RFC 5424), the ones the daemons use
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6
NAMES = {ERR: "error", WARNING: "warning", NOTICE: "notice", INFO: "info"}


def to_journal(stream):
    """Whether stream is the journal stream systemd connected."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        return False


class Log(object):
    """log(line, priority=INFO) writes one line to stream (stdout by
    default) at once."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.journal = to_journal(self.stream)

    def __call__(self, line, priority=INFO):
        if self.journal:
            text = "<%d>%s\n" % (priority, line)
        else:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
            text = "%s %s %s\n" % (stamp, NAMES.get(priority, priority), line)
        self.stream.write(text)
        self.stream.flush()
