"""The collection as a user takes it: the tarball built, installed with
ansible-galaxy into an empty collections path, and the README's role
example run from that install (never from the working tree) against
namespace hosts, with real traffic through the VIP, then every module
(playbooks/modules.yml); under the oldest ansible-core that
requires_ansible admits, the newest on this controller's Python, and the
newest release on a newer Python."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from xvstest.lab import Lab, build_dsr_lab, curl
from xvstest.modules import PYENV, ansible_venv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
BACKENDS = {"web1": "192.0.2.21", "web2": "192.0.2.22"}   # the README example's destinations

# (ansible-core, controller Python): 2.14.0 is the oldest requires_ansible
# admits; 2.19.14 the newest on Python 3.11 (Debian 12); 2.20 and later need
# Python 3.12 or newer on the controller.
VERSIONS = [("2.14.0", "/usr/bin/python3"), ("2.19.14", None), ("2.21.5", PYENV % "3.12.1")]


def readme_example():
    """The README's role example: the first yaml block of 'Rolling out with the roles'."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("### Rolling out with the roles", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def version():
    with open(os.path.join(ROOT, "galaxy.yml")) as f:
        return yaml.safe_load(f)["version"]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    r = subprocess.run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--output-path",
                        str(out), ROOT], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out / ("xvs-lb-%s.tar.gz" % version()))


def ansible_bin(tmp_path, core, python):
    """The bin directory of an ansible-core: this venv's, or a new venv."""
    return BIN if python is None else ansible_venv(str(tmp_path / "venv"), core, python)


def inventory(lab, work):
    """Each host a namespace, reached with the local connection and a Python
    started inside it; state, pins and persistence in the scratch directory."""
    def python(short):
        path = os.path.join(work, "python-" + short)
        with open(path, "w") as f:
            f.write('#!/bin/sh\nexec ip netns exec %s /usr/bin/python3 "$@"\n' % lab.name(short))
        os.chmod(path, 0o700)
        return path
    return {"all": {
        # the example says become: true; here the controller is root already
        "vars": {"ansible_connection": "local", "ansible_become": False},
        "children": {
            "webservers": {"hosts": dict((name, {"ansible_python_interpreter": python(name),
                                                 "realserver_persist": False}) for name in BACKENDS)},
            "balancers": {"hosts": {"lb1": {
                "ansible_python_interpreter": python("bal"),
                "xvs_bpffs": os.path.join(work, "bpffs", "lb"),
                "xvs_state_dir": os.path.join(work, "etc"),
                "xvs_install_packages": False,      # setup-host installed them on this machine
                "xvs_restore_at_boot": False,
                "xvs_agent": False, "xvs_cli": False}}}}}}


@pytest.mark.parametrize("core,python", VERSIONS, ids=[v[0] for v in VERSIONS])
def test_readme_role_example_from_the_installed_tarball(tarball, tmp_path, core, python):
    bindir = ansible_bin(tmp_path, core, python)
    work = str(tmp_path / "work")
    os.makedirs(os.path.join(work, "bpffs"))
    collections = str(tmp_path / "collections")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_NOCOLOR="1", PYTHONPATH="")
    r = subprocess.run([os.path.join(bindir, "ansible-galaxy"), "collection", "install", "-p", collections,
                        tarball], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    installed = os.path.join(collections, "ansible_collections", "xvs", "lb")
    assert os.path.isfile(os.path.join(installed, "roles", "xvs", "tasks", "main.yml"))
    assert not os.path.islink(installed)
    with open(str(tmp_path / "site.yml"), "w") as f:
        yaml.safe_dump(readme_example(), f)
    subprocess.run(["mount", "-t", "bpf", "bpf", os.path.join(work, "bpffs")], check=True)
    try:
        with Lab("xi") as lab:
            build_dsr_lab(lab, tmp_path, BACKENDS, realserver=False)   # the role prepares them
            with open(str(tmp_path / "hosts.yml"), "w") as f:
                yaml.safe_dump(inventory(lab, work), f)
            play = [os.path.join(bindir, "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
                    str(tmp_path / "site.yml")]
            for run in ("converge", "rerun"):
                r = subprocess.run(play, env=env, capture_output=True, text=True, timeout=600,
                                   check=False)
                assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
                changed = [int(n) for n in re.findall(r"changed=(\d+)", r.stdout)]
                assert (sum(changed) > 0) if run == "converge" else (sum(changed) == 0), r.stdout
            # real traffic through the VIP reaches both destinations of the example
            answers = [curl(lab, "whoami", 47000 + i).stdout for i in range(24)]
            assert sorted(set(answers)) == ["web1", "web2"], answers
            with open(os.path.join(work, "etc", "state.json")) as f:
                recorded = json.load(f)["services"]
            assert [(d["address"], d["weight"]) for d in recorded[0]["destinations"]] == [
                ("192.0.2.21", 1), ("192.0.2.22", 2)]
            # and every module, called as a user calls them, from the same install
            r = subprocess.run(play[:-1] + [os.path.join(ROOT, "tests", "integration", "playbooks", "modules.yml")],
                               env=env, capture_output=True, text=True, timeout=600, check=False)
            assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
            assert re.search(r"lb1\s+: ok=\d+\s+changed=6\s+unreachable=0\s+failed=0\s+skipped=0\s+rescued=0\s+"
                             r"ignored=2", r.stdout), r.stdout[-3000:]
    finally:
        subprocess.run(["umount", "-l", os.path.join(work, "bpffs")], check=False)
        shutil.rmtree(work, ignore_errors=True)
