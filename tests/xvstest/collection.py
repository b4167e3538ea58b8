"""This checkout as the collection xvs.lb: module_utils import one another
as ansible_collections.xvs.lb, and Ansible finds collections by that path,
so the tests, the benchmarks and the demo each make a directory holding
ansible_collections/xvs/lb -> the checkout (the repository root is the
collection root), and put it on sys.path or ANSIBLE_COLLECTIONS_PATH."""
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def link(parent=None):
    """The directory (parent, or a new temporary one) holding
    ansible_collections/xvs/lb -> this checkout."""
    parent = parent or tempfile.mkdtemp(prefix="xvs-coll-")
    os.makedirs(os.path.join(parent, "ansible_collections", "xvs"), exist_ok=True)
    os.symlink(ROOT, os.path.join(parent, "ansible_collections", "xvs", "lb"))
    return parent


def unlink(parent):
    """Remove what link() made under parent (and parent itself, if empty)."""
    try:
        os.unlink(os.path.join(parent, "ansible_collections", "xvs", "lb"))
        os.removedirs(os.path.join(parent, "ansible_collections", "xvs"))
    except OSError:
        pass
