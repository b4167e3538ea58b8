# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Destination health: which destinations xvs-agent last found failing.

Health is a mask over the desired state, never a change to it: the planner
writes a failing destination with weight 0 and every other one with its
desired weight, whoever runs it (a module, the role, the boot restore, the
agent).  The agent alone writes the health file, under the host lock.

The file lives in /run, so it is gone after a reboot: the boot restore
starts every destination as the state of record says and the agent's
checks decide again.  It survives an agent restart, so a restarted agent
starts from what it knew and does not flap.  There is one health file per
state of record (its name is derived from the state file's path), so two
pin roots with their own state files keep their own health.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os

from ansible_collections.xvs.lb.plugins.module_utils import _state
from ansible_collections.xvs.lb.plugins.module_utils._errors import XvsError

HEALTH_DIR = "/run/xvs"
FORMAT = 1


def path_for(state_file):
    """The health file of the state of record at state_file: its absolute
    path with "/" spelled "%2F" ("%" as "%25"), one name per path."""
    name = os.path.abspath(state_file).replace("%", "%25").replace("/", "%2F")
    return os.path.join(HEALTH_DIR, name + ".health")


def label(key):
    """A service key as the health file and the agent's log name it."""
    return "%s:%d/%s" % key


def load(state_file):
    """{service key: {failing destination address: reason}}; empty when
    no agent has written health for this state of record."""
    path = path_for(state_file)
    try:
        with open(path) as f:
            data = json.load(f)
    except (IOError, OSError):
        if os.path.exists(path):
            raise XvsError("health file %s (of state_file=%s) cannot be read" % (path, state_file))
        return {}
    except ValueError:
        raise XvsError("health file %s (of state_file=%s) is not valid JSON; remove it and "
                       "restart xvs-agent" % (path, state_file))
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("down"), list):
        raise XvsError("health file %s (of state_file=%s) is not of format %d; remove it and "
                       "restart xvs-agent" % (path, state_file, FORMAT))
    down = {}
    for item in data["down"]:
        key = (item["address"], item["port"], item["protocol"])
        down.setdefault(key, {})[item["destination"]] = item.get("reason", "")
    return down


def announcements(state_file):
    """What the agent last wrote of its announcements: {"announced": {vip:
    "announced" or "draining"}, "maintenance": None, "draining" or
    "withdrawn"}, or None when no agent has written health for this state
    of record (or it announces nothing: no BGP)."""
    try:
        with open(path_for(state_file)) as f:
            data = json.load(f)
    except (IOError, OSError, ValueError):
        return None
    return data.get("announce") if isinstance(data, dict) else None


def save(state_file, down, services_down=(), announce=None):
    """Write the health of the state of record at state_file atomically
    (root only): down as load() returns it, the keys of the services
    that have fewer healthy destinations than their min_healthy, and the
    agent's announcements as announcements() returns them."""
    items = [{"address": k[0], "port": k[1], "protocol": k[2], "destination": d, "reason": r}
             for k in sorted(down) for d, r in sorted(down[k].items())]
    body = {"format": FORMAT, "state_file": os.path.abspath(state_file), "down": items,
            "services_down": [label(k) for k in sorted(services_down)], "announce": announce}
    _state.replace_file(path_for(state_file),
                        (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def remove(state_file):
    try:
        os.unlink(path_for(state_file))
    except OSError:
        pass
