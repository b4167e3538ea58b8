"""ansible-lint (production profile) run as a user runs it, the changelog
as antsibull-changelog lints it, and a collection tarball without test
output or caches."""
import os
import shutil
import subprocess
import sys
import tarfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from test_molecule import INSTALLED, tool_env  # noqa: E402


def test_ansible_lint_production_profile():
    shutil.rmtree(INSTALLED, ignore_errors=True)
    try:
        # at the root of the checkout, no paths: what a user or the
        # ansible-lint CI action runs (it lints galaxy.yml and the changelog too)
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-lint"),
                            "--profile", "production"], cwd=ROOT, env=tool_env(),
                           capture_output=True, text=True, timeout=900, check=False)
    finally:
        shutil.rmtree(INSTALLED, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stderr + r.stdout


def version():
    with open(os.path.join(ROOT, "galaxy.yml")) as f:
        return yaml.safe_load(f)["version"]


def test_changelog_lints_and_releases_this_version():
    tool = os.path.join(os.path.dirname(sys.executable), "antsibull-changelog")
    for argv in ([tool, "lint"], [tool, "lint-changelog-yaml", "changelogs/changelog.yaml"]):
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    with open(os.path.join(ROOT, "changelogs", "changelog.yaml")) as f:
        release = yaml.safe_load(f)["releases"][version()]
    assert release["changes"]["release_summary"]
    with open(os.path.join(ROOT, "CHANGELOG.rst")) as f:
        assert "\nv%s\n" % version() in f.read()


def test_collection_tarball_is_clean(tmp_path):
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-galaxy"),
                        "collection", "build", "--output-path", str(tmp_path), ROOT],
                       env=tool_env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    with tarfile.open(str(tmp_path / ("xvs-lb-%s.tar.gz" % version()))) as t:
        names = t.getnames()
    assert "files/xdp_lb.c" in names and "roles/xvs/tasks/main.yml" in names
    assert "plugins/modules/xvs_attach.py" in names
    bad = [n for n in names if any(p in n.split("/") for p in
                                   ("__pycache__", ".venv", ".pytest_cache", "output", ".git"))
           or n.endswith(".pyc")]
    assert bad == []
