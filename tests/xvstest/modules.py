"""Modules run the way Ansible runs them, without Ansible in between:
the module file executed by Python with a JSON arguments file, inside the
balancer's namespace.  Fast enough for a matrix of cases, and it lets many
runs start at once."""
import json
import os
import re
import subprocess
import sys
import tempfile

from xvstest.packets import mac_for

BIN = os.path.dirname(sys.executable)
# the Pythons this kind of machine keeps under pyenv, by version
PYENV = os.path.expanduser("~/.pyenv/versions/%s/bin/python3")


def collections_path():
    from ansible_collections.xvs import lb
    return os.path.dirname(os.path.dirname(os.path.dirname(lb.__path__[0])))


def ansible_env():
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_path(),
                ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", ANSIBLE_LOCALHOST_WARNING="false",
                ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_NOCOLOR="1",
                PYTHONPATH=collections_path())


def ansible_venv(venv, core, python):
    """A new virtual environment of python with ansible-core core: its
    bin directory (from PyPI, which these machines reach)."""
    subprocess.run([python, "-m", "venv", venv], check=True, timeout=300)
    r = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                        "ansible-core==%s" % core], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(venv, "bin")


def balancer_ns(lab, neighbours=range(20, 40)):
    """A balancer namespace: eth0 at 192.0.2.2/24 (its peer in another
    namespace) with permanent neighbour entries for 192.0.2.<neighbours>,
    so destinations resolve without ARP."""
    ns, peer = lab.add("bal"), lab.add("peer")
    lab.veth(ns, "eth0", peer, "eth0")
    lab.sh(ns, "ip addr add 192.0.2.2/24 dev eth0; " + "; ".join(
        "ip neigh replace 192.0.2.%d lladdr %s dev eth0 nud permanent" % (i, mac_for("192.0.2.%d" % i))
        for i in neighbours))
    return ns


class Modules(object):
    """Module runs against one pin root with its own state of record."""

    def __init__(self, ns, root):
        self.ns, self.root = ns, root
        self.work = tempfile.mkdtemp(prefix="xvs-modargs-")
        self.state_file = os.path.join(self.work, "state.json")
        self.n = 0
        self.env = ansible_env()

    def start(self, name, args, defaults=True):
        """Start one module run; bpffs and state_file default to this
        root's (unless defaults is False: the realserver's modules)."""
        self.n += 1
        path = os.path.join(self.work, "%s-%d.json" % (name, self.n))
        with open(path, "w") as f:
            common = {"bpffs": self.root, "state_file": self.state_file} if defaults else {}
            json.dump({"ANSIBLE_MODULE_ARGS": dict(common, **args)}, f)
        return subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                                 "ansible_collections.xvs.lb.plugins.modules." + name, path],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def call(self, name, args, defaults=True):
        """(exit status, the module's JSON result)."""
        p = self.start(name, args, defaults)
        out = p.communicate(timeout=300)[0]
        try:
            return p.returncode, json.loads(out[out.index("{"):])
        except ValueError:
            raise AssertionError("module %s printed no JSON result:\n%s" % (name, out))

    def close(self):
        import shutil
        shutil.rmtree(self.work, ignore_errors=True)


def playbook(work, role):
    """A playbook at work/<role>.yml that applies xvs.lb.<role> to localhost."""
    path = os.path.join(str(work), "%s.yml" % role)
    with open(path, "w") as f:
        json.dump([{"hosts": "localhost", "gather_facts": False,
                    "tasks": [{"ansible.builtin.include_role": {"name": "xvs.lb." + role}}]}], f)
    return path


def start_role(ns, book, variables):
    """Start ansible-playbook with the local connection inside namespace ns."""
    return subprocess.Popen(["ip", "netns", "exec", ns, os.path.join(BIN, "ansible-playbook"), "-i", "localhost,",
                             "-c", "local", "-e", json.dumps(variables), book],
                            env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def changed(procs):
    """Run the role processes to the end: the changed count of each."""
    out = []
    for p in procs:
        text = p.communicate(timeout=600)[0]
        assert p.returncode == 0, text[-6000:]
        out.append(int(re.search(r"localhost\s+:.*changed=(\d+)", text).group(1)))
    return out


def agent_command(*args):
    """xvs-agent as its unit runs it: the system Python, the collection's
    module_utils (here from this checkout), the arguments given."""
    code = ("import sys; sys.path.insert(0, %r); from ansible_collections.xvs.lb.plugins.module_utils "
            "import _agent_cli; sys.exit(_agent_cli.main(sys.argv[1:]))" % collections_path())
    return ["/usr/bin/python3", "-c", code] + list(args)


def role_script(work, template, interpreter="/usr/bin/python3", **variables):
    """The role's script template (roles/xvs/templates/<template>), rendered
    as the role renders it with variables, run by interpreter with
    the library xvs_attach installs for it (built from the working tree, as
    the action plugin builds it), in directory work: the command."""
    import jinja2
    from ansible_collections.xvs.lb.plugins.action import xvs_attach as xvs_attach_action
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    work = str(work)
    library = os.path.join(work, "xvs-lb.zip")
    if not os.path.exists(library):
        with open(library, "wb") as f:
            f.write(xvs_attach_action.library(root))
    with open(os.path.join(root, "roles", "xvs", "templates", template)) as f:
        text = jinja2.Template(f.read()).render(ansible_managed="test", xvs_lib_dir=work, **variables)
    path = os.path.join(work, template[:-len(".j2")])
    with open(path, "w") as f:
        f.write(text)
    return [interpreter, path]


def restore_command(work):
    """The boot restore's command, before its state file argument."""
    return role_script(work, "xvs-restore.j2", xvs_state_dir="/nonexistent")


def cli_command(work, bpffs, state_file):
    """`xvs`, as the role installs it for the pin root bpffs and the state
    of record state_file."""
    return role_script(work, "xvs.j2", interpreter="/bin/sh", xvs_bpffs=bpffs, xvs_state_dir=os.path.dirname(state_file))
