"""environment.yml (conda-forge) and pyproject.toml list the same dependencies; README quick start."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# PyPI name (canonical, extras dropped) -> conda-forge name, where they differ.
PYPI_TO_CONDA = {
    "xcube-core": "xcube",
    "torch": "pytorch",
    "duckdb": "python-duckdb",
}
# conda-only entries of environment.yml, and why pyproject.toml does not list them.
CONDA_ONLY = {
    "python": "the interpreter (pyproject: requires-python)",
    "pip": "installs the project itself (pip: -e .)",
    "gdal": "GDAL and its bindings; scripts/install.sh installs them for the venv",
    "flask": "moto[server]'s server mode (the extra has no conda-forge equivalent)",
    "flask-cors": "moto[server]'s server mode",
}
# conda builds a spec insists on (name -> glob on the build string)
CONDA_BUILDS = {"pytorch": "cpu_*"}

_CONDA_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<version>[^\s]*)\s*(?P<build>\S*)$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pyproject_requirements() -> dict[str, SpecifierSet]:
    """Runtime dependencies plus the ``test`` extra: conda name -> version specifier."""
    project = _pyproject()["project"]
    out = {}
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        out[PYPI_TO_CONDA.get(name, name)] = req.specifier
    return out


def parse_conda_spec(text: str) -> tuple[str, str, str]:
    """``"zarr>=3.0.8,<4"`` or ``"pytorch >=2.1 cpu_*"`` -> (name, version spec, build)."""
    m = _CONDA_SPEC.match(text.strip())
    assert m, f"environment.yml: cannot parse dependency {text!r}"
    version = m["version"]
    if version.startswith("="):  # conda's "python=3.11" means 3.11.*
        version = version.lstrip("=")
    if version and version[0].isdigit():
        version = f"=={version}.*" if version.count(".") < 2 else f"=={version}"
    return m["name"].lower(), version, m["build"]


def environment_requirements() -> tuple[dict[str, tuple[str, str]], list[str]]:
    """conda name -> (version spec, build); and the pip section."""
    conda, pip = {}, []
    for dep in _environment()["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep.get("pip", []))
            continue
        name, version, build = parse_conda_spec(dep)
        assert name not in conda, f"environment.yml lists {name} twice"
        conda[name] = (version, build)
    return conda, pip


def test_environment_channel_name_and_pip_section():
    env = _environment()
    assert env["name"] == "deepearth-cube"
    assert env["channels"][0] == "conda-forge"
    assert "defaults" not in env["channels"]
    conda, pip = environment_requirements()
    assert pip == ["-e ."]
    version, _ = conda["python"]
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert SpecifierSet(version).contains("3.11.9") and requires.contains("3.11.9")


def test_same_packages_in_both_files():
    pyproject = set(pyproject_requirements())
    conda, _ = environment_requirements()
    conda_names = set(conda) - set(CONDA_ONLY)
    assert pyproject - conda_names == set(), "in pyproject.toml but not in environment.yml"
    assert conda_names - pyproject == set(), "in environment.yml but not in pyproject.toml"


@pytest.mark.parametrize("name", sorted(pyproject_requirements()))
def test_same_version_bounds(name):
    conda, _ = environment_requirements()
    version, build = conda[name]
    assert SpecifierSet(version) == pyproject_requirements()[name], (
        f"{name}: environment.yml says {version!r}, pyproject.toml "
        f"{str(pyproject_requirements()[name])!r}"
    )
    assert build == CONDA_BUILDS.get(name, ""), f"{name}: build {build!r}"


@pytest.mark.parametrize(
    "name, allowed, excluded",
    [
        ("zarr", ["3.0.8", "3.1.6"], ["2.18.3", "4.0.0"]),
        ("pandas", ["2.1.0", "2.3.3"], ["3.0.0", "2.0.3"]),
        ("tornado", ["6.3.3", "6.4.2"], ["6.5.0", "6.5.1"]),
        ("xcube", ["1.14.0", "1.14.3"], ["1.13.2", "1.15.0"]),
    ],
)
def test_pinned_versions(name, allowed, excluded):
    """The versions the design was verified with are allowed, others are not, in both files."""
    conda, _ = environment_requirements()
    for spec in (SpecifierSet(conda[name][0]), pyproject_requirements()[name]):
        for v in allowed:
            assert spec.contains(v), f"{name} {spec} should allow {v}"
        for v in excluded:
            assert not spec.contains(v), f"{name} {spec} should exclude {v}"


def test_conda_only_entries_are_justified():
    conda, _ = environment_requirements()
    for name in CONDA_ONLY:
        assert name in conda, f"CONDA_ONLY lists {name} but environment.yml does not"
    assert "gdal" in (ROOT / "scripts" / "install.sh").read_text()


def test_parse_conda_spec():
    assert parse_conda_spec("zarr>=3.0.8,<4") == ("zarr", ">=3.0.8,<4", "")
    assert parse_conda_spec("pytorch >=2.1 cpu_*") == ("pytorch", ">=2.1", "cpu_*")
    assert parse_conda_spec("python=3.11") == ("python", "==3.11.*", "")
    assert parse_conda_spec("gdal") == ("gdal", "", "")


def _section(markdown: str, title: str) -> str:
    m = re.search(rf"^##\s+{re.escape(title)}\s*$(.*?)(?=^##\s|\Z)", markdown, re.M | re.S | re.I)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def test_readme_quick_start():
    readme = (ROOT / "README.md").read_text()
    quick = _section(readme, "Quick start")
    first_block = re.search(r"```[a-z]*\n(.*?)```", quick, re.S)
    assert first_block, "Quick start has no code block"
    lines = [ln.split("#", 1)[0].strip() for ln in first_block.group(1).splitlines()]
    commands = [ln for ln in lines if ln]  # comments dropped
    assert commands[:2] == ["make demo", "make test"]
    assert "conda env create -f environment.yml" in quick
    assert "conda activate deepearth-cube" in quick
    assert "deepearth synth --preset" in _section(readme, "Synthetic source")
