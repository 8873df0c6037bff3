"""Packaging facts that can be checked from the source tree, without building anything.

The build itself (sdist + wheel, installed into a clean virtual environment) is `make package`.
"""

import ast
import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from trove_classifiers import classifiers as TROVE_CLASSIFIERS

import lightning_chaos

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
#: The CPU wheel every setup step installs first (see the Makefile).
TORCH_CPU_WHEEL = Version("2.13.0")


def all_requirements():
    yield from (Requirement(r) for r in PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        yield from (Requirement(r) for r in extra)


def test_installed_version_is_the_package_version():
    installed = importlib.metadata.version("lightning-chaos")
    assert installed == lightning_chaos.__version__, (
        f"installed metadata says {installed}, lightning_chaos.__version__ is {lightning_chaos.__version__}: "
        "reinstall the package (rm .venv/.installed && make setup)"
    )


def test_version_has_one_source_that_setuptools_reads_without_importing():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert dynamic["dynamic"]["version"] == {"attr": "lightning_chaos.__version__"}
    # setuptools reads `attr:` statically when the value is a literal at module level; otherwise it imports
    # the package, which fails in an isolated build (no torch there).
    tree = ast.parse((ROOT / "lightning_chaos" / "__init__.py").read_text(encoding="utf-8"))
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [lightning_chaos.__version__]
    Version(lightning_chaos.__version__)  # a valid PEP 440 version


def test_license_and_type_marker_exist():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a notice
    assert (ROOT / "lightning_chaos" / "py.typed").is_file()


def test_classifiers_are_valid_trove_classifiers():
    invalid = [c for c in PROJECT["classifiers"] if c not in TROVE_CLASSIFIERS]
    assert not invalid, f"not trove classifiers (a package index rejects the upload): {invalid}"
    # With an SPDX `license` expression, a `License ::` classifier is an error for setuptools and PyPI.
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]


def test_torch_requirement_admits_the_cpu_wheel():
    torch_requirements = [r for r in all_requirements() if r.name == "torch"]
    assert torch_requirements, "torch is not a declared dependency"
    for requirement in torch_requirements:
        assert requirement.specifier.contains(TORCH_CPU_WHEEL), (
            f"{requirement} excludes torch {TORCH_CPU_WHEEL}: pip would replace the CPU wheel by a CUDA build"
        )


def test_extras_that_name_the_package_name_existing_extras():
    extras = set(PROJECT["optional-dependencies"])
    for requirement in all_requirements():
        if requirement.name == PROJECT["name"]:
            assert requirement.extras <= extras, f"{requirement}: unknown extra {requirement.extras - extras}"
