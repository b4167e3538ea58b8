"""`ansible-test sanity` over the collection (scripts/sanity): no ignore
file, every test it runs must pass."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_no_sanity_ignore_files():
    assert not os.path.exists(os.path.join(ROOT, "tests", "sanity", "ignore-2.19.txt"))
    assert [f for f in os.listdir(os.path.join(ROOT, "tests", "sanity"))
            if f.startswith("ignore")] == []


def test_ansible_test_sanity_passes():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "sanity")], capture_output=True,
                       text=True, timeout=1800, check=False)
    ran = re.findall(r'^Running sanity test "([^"]+)"', r.stdout, re.M)
    errors = [line for line in (r.stdout + r.stderr).splitlines()
              if line.startswith(("ERROR", "FATAL"))]
    assert r.returncode == 0, "\n".join(errors) or r.stdout[-3000:] + r.stderr[-3000:]
    # the tests that matter for a collection of modules did run
    for name in ("validate-modules", "pylint", "pep8", "import", "compile", "ansible-doc",
                 "yamllint"):
        assert name in ran, "sanity test %s did not run: %s" % (name, ran)
