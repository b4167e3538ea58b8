# -*- coding: utf-8 -*-
# Copyright (c) xvs.lb contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The health checks' probes (docs/design.md section 3.4): one function
per check type, registered in PROBES, and run_check(), which runs one and
turns whatever the destination does into (healthy, reason).  The
scheduling is xvs-agent's (_agent)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import http.client
import os
import shlex
import socket
import ssl
import subprocess


class _HTTPSToAddress(http.client.HTTPSConnection):
    """HTTPS to one address with another name as the TLS server name (SNI):
    the check reaches the destination itself, as a client of the service's
    name would.  http.client takes the server name from the host it
    connects to."""

    def __init__(self, address, port, server_name, timeout, context):
        http.client.HTTPSConnection.__init__(self, address, port, timeout=timeout, context=context)
        self.server_name, self.tls = server_name, context

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)


def _http(check, address, port, key):
    if check["type"] == "https":
        # a health check asks "does it answer?", not "whom do I trust?":
        # backends commonly serve self-signed or internal certificates
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = _HTTPSToAddress(address, port, check.get("host"), check["timeout"], context)
    else:
        conn = http.client.HTTPConnection(address, port, timeout=check["timeout"])
    try:
        conn.request("GET", check["path"], headers={
            "Host": check.get("host") or ("[%s]" % address if ":" in address else address),
            "User-Agent": "xvs-agent", "Connection": "close"})
        status = conn.getresponse().status
    finally:
        conn.close()
    if status != check["expect_status"]:
        return False, "HTTP status %d, expected %d" % (status, check["expect_status"])
    return True, "HTTP status %d" % status


def _tcp(check, address, port, key):
    socket.create_connection((address, port), timeout=check["timeout"]).close()
    return True, "connected to port %d" % port


def _exec(check, address, port, key):
    env = dict(os.environ, XVS_DESTINATION=address, XVS_PORT=str(port), XVS_SERVICE_ADDRESS=key[0],
               XVS_SERVICE_PORT=str(key[1]), XVS_SERVICE_PROTOCOL=key[2])
    # xvs-agent runs this, on the system Python outside Ansible: there is
    # no AnsibleModule to run the check through (pylint's advice)
    r = subprocess.run(shlex.split(check["command"]), env=env, timeout=check["timeout"],  # pylint: disable=ansible-bad-function
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       check=False)
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return False, "exit status %d%s" % (r.returncode, (": " + err[-1][:200]) if err else "")
    return True, "exit status 0"


def run_check(check, address, key):
    """(healthy, reason) of one check of destination address of the
    service key; never raises for what the destination does."""
    port = check["port"] or key[1]
    try:
        return PROBES[check["type"]](check, address, port, key)
    except (socket.timeout, subprocess.TimeoutExpired):
        return False, "no answer within %gs" % check["timeout"]
    except ssl.SSLError as e:
        return False, "TLS: %s" % (e.reason or e)
    except (http.client.HTTPException, ValueError) as e:
        return False, "HTTP: %s" % (e.__class__.__name__ if not str(e) else e)
    except OSError as e:
        return False, "%s (port %d)" % (e.strerror or e, port)


# a check type (_spec.CHECK_TYPES) -> its probe(check, address, port, service key)
PROBES = {"tcp": _tcp, "http": _http, "https": _http, "exec": _exec}
