"""module_utils in layers: each file imports only the files docs/design.md
section 1 lists above it, so the table is the dependency order a reader
can trust, and a cycle cannot creep in."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UTILS = os.path.join(ROOT, "plugins", "module_utils")


def table_order():
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    section = text[text.index("Inside module_utils, one place for each fact"):text.index("## 2. Data plane")]
    order = []
    for cell in re.findall(r"^\| (`_[^|]+) \|", section, re.M):
        order += re.findall(r"`(_\w+)\.py`", cell)
    return order


def imports(name):
    with open(os.path.join(UTILS, name + ".py")) as f:
        text = f.read()
    found = set(re.findall(r"module_utils\.(_\w+) import", text))
    for group in re.findall(r"module_utils import \(?([^)\n]+(?:\n[^)\n]+)*)\)?", text):
        found |= set(re.findall(r"\b(_\w+)\b", group))
    return found


def test_every_module_utils_file_is_in_the_table():
    files = sorted(n[:-3] for n in os.listdir(UTILS) if n.startswith("_") and n.endswith(".py")
                   and n != "__init__.py")
    assert sorted(table_order()) == files


@pytest.mark.parametrize("name", table_order())
def test_imports_only_what_is_above(name):
    order = table_order()
    above = set(order[:order.index(name)])
    assert imports(name) - {name} <= above, "%s imports %s, listed below it" % (
        name, sorted(imports(name) - above - {name}))
