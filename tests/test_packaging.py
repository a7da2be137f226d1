"""Packaging (issue 13, item 2): the wheel holds every module of the tree.

A wheel built with `pip install .` (not `-e`) once lacked fastpurify.defenses and fastpurify.reference.defenses,
because pyproject.toml lists the packages by hand (the top-level kernels/ folder is installed as
fastpurify.kernels, which automatic discovery cannot do) and the list had rotted: `import fastpurify` failed.
These tests compare the list with the tree and build a wheel (without the C++ extension: 3 s instead of minutes)
to compare its contents with the tree's modules. `.ci/wheel_smoke.sh` installs a full wheel in a fresh virtualenv
and purifies a model with it.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Folders of the source tree that are not part of the installed package.
NOT_SHIPPED = ("build", "dist", ".git", "__pycache__", "*.egg-info", "*.so", ".pytest_cache", ".benchmarks",
               ".ruff_cache", ".venv", ".data", ".whl", "benchmarks", "tests")


def _setuptools_config(root: Path) -> dict:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _tree_packages(root: Path) -> dict:
    """Every package the tree holds, as {dotted name: folder}, with package-dir's remapping applied."""
    package_dir = _setuptools_config(root)["package-dir"]
    out = {}
    for name, folder in package_dir.items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            dotted = ".".join((name, *rel.parts)) if rel.parts else name
            # a nested folder remapped elsewhere (kernels/ is fastpurify.kernels) is listed under its own mapping
            out.setdefault(dotted, init.parent)
    return out


def _tree_modules(root: Path) -> set:
    """The .py files the package must install, as paths inside the wheel (fastpurify/..., fastpurify/kernels/...)."""
    mods = set()
    for dotted, folder in _tree_packages(root).items():
        for py in folder.glob("*.py"):
            mods.add("/".join(dotted.split(".")) + "/" + py.name)
    return mods


def test_package_list_matches_the_tree():
    listed = set(_setuptools_config(ROOT)["packages"])
    found = set(_tree_packages(ROOT))
    assert found - listed == set(), f"packages in the tree but not in pyproject.toml's packages: {found - listed}"
    assert listed - found == set(), f"packages listed in pyproject.toml that the tree lacks: {listed - found}"


def test_every_source_folder_is_a_package():
    """A folder of modules without __init__.py would be a namespace package that the list above cannot see."""
    missing = []
    for folder in (ROOT / "fastpurify", ROOT / "kernels"):
        for sub in [folder, *folder.rglob("*")]:
            if sub.is_dir() and sub.name != "__pycache__" and any(sub.glob("*.py")) \
                    and not (sub / "__init__.py").is_file():
                missing.append(str(sub.relative_to(ROOT)))
    assert not missing, f"folders with modules but no __init__.py (add one): {missing}"


def _build_wheel(src: Path, out: Path) -> Path:
    """Build a wheel of ``src`` without the extension, from a clean copy (a build/ folder left by an earlier build
    would put stale modules in the wheel)."""
    copy = out / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    env = {"FASTPURIFY_SKIP_EXT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(copy),
                          "-w", str(out / "wheel")], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=600)
    if res.returncode != 0 and "No module named pip" in res.stderr:
        pytest.skip("pip is not installed in this interpreter")
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (out / "wheel").glob("fastpurify-*.whl")
    return wheel


def test_wheel_holds_every_module(tmp_path):
    wheel = _build_wheel(ROOT, tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.endswith(".py")}
    missing = sorted(_tree_modules(ROOT) - shipped)
    assert not missing, f"the wheel {wheel.name} lacks {missing}"
    assert "fastpurify/kernels/__init__.py" in shipped and not any(n.startswith("kernels/") for n in names)
    entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert entry, "the wheel has no entry_points.txt (the fastpurify command)"


def test_readme_test_command_is_what_ci_runs():
    """The README's "Set everything up and run the tests" command and .ci/run's are the same line."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    (command,) = [line for line in ci if " -m pytest tests " in line]
    assert command in readme, f".ci/run's test command is not in README.md: {command}"
    assert "-rfEs" in command  # failed and errored tests are named in the summary, not only skips
    assert "bash .ci/wheel_smoke.sh" in ci
