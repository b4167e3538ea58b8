"""`ansible-test sanity` over the collection (scripts/sanity): no ignore
file, every test it runs must pass, under the oldest ansible-core that
requires_ansible admits on its oldest controller Python, the project's
own (2.19 on Debian 12's Python 3.11) and the newest release on the newest
Python this machine has; and `ansible-test units`."""
import os
import re
import subprocess

import pytest

from xvstest.modules import PYENV, ansible_venv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (ansible-core, controller Python): None is the project's .venv
SANITY = [("2.14.18", PYENV % "3.9.18"), (None, None), ("2.21.5", PYENV % "3.13.0")]


def scripts_sanity(tmp_path, core, python, *args):
    env = dict(os.environ)
    if core is not None:
        env["XVS_SANITY_VENV"] = os.path.dirname(ansible_venv(str(tmp_path / "venv"), core, python))
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "sanity")] + list(args), capture_output=True,
                          text=True, timeout=1800, check=False, env=env)


def test_no_sanity_ignore_files():
    assert [f for f in os.listdir(os.path.join(ROOT, "tests", "sanity"))
            if f.startswith("ignore")] == []


@pytest.mark.parametrize("core,python", SANITY, ids=[c or "venv" for c, p in SANITY])
def test_ansible_test_sanity_passes(tmp_path, core, python):
    r = scripts_sanity(tmp_path, core, python)
    ran = re.findall(r'^Running sanity test "([^"]+)"', r.stdout, re.M)
    errors = [line for line in (r.stdout + r.stderr).splitlines()
              if line.startswith(("ERROR", "FATAL"))]
    assert r.returncode == 0, "\n".join(errors) or r.stdout[-3000:] + r.stderr[-3000:]
    # the tests that matter for a collection of modules did run
    for name in ("validate-modules", "pylint", "pep8", "import", "compile", "ansible-doc",
                 "yamllint"):
        assert name in ran, "sanity test %s did not run: %s" % (name, ran)


def test_ansible_test_units_passes(tmp_path):
    """tests/unit/requirements.txt is all `ansible-test units` needs."""
    r = scripts_sanity(tmp_path, None, None, "units")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) > 100 and not re.search(r"\d+ (failed|error)", r.stdout), r.stdout[-3000:]
