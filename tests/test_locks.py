"""The lock files constraints/<stack>.txt still match pyproject.toml and their stack's top-level pins."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("paper", "current")
_spec = importlib.util.spec_from_file_location("lock_script", ROOT / "scripts" / "lock.py")
lock_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_script)


def lock_pins(stack: str) -> dict[str, str]:
    lines = (ROOT / "constraints" / f"{stack}.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            assert match, f"constraints/{stack}.txt: {line!r} is not an exact name==version pin"
            pins[lock_script.canonical_name(match.group(1))] = match.group(2)
    return pins


def lock_environment(stack: str) -> dict[str, str]:
    """The marker environment the lock was resolved for (its header: `for cpython 3.11 on linux x86_64`)."""
    header = (ROOT / "constraints" / f"{stack}.txt").read_text()
    match = re.search(r"for (\w+) (\d+\.\d+) on (\w+) (\w+)\.", header)
    assert match, f"constraints/{stack}.txt has no 'Resolved ... for <python> <version> on <platform>' line"
    return {**default_environment(), "implementation_name": match.group(1), "python_version": match.group(2),
            "sys_platform": match.group(3), "platform_machine": match.group(4)}


def requirements_for(stack: str, pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, Requirement]]:
    """(where, requirement) for every pyproject requirement whose marker holds on the lock's platform."""
    environment = lock_environment(stack)
    found = []
    for extra, entries in lock_script.project_requirements(pyproject).items():
        for entry in entries:
            requirement = Requirement(entry)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                found.append((f"[project.optional-dependencies].{extra}" if extra else "[project.dependencies]",
                              requirement))
    return found


def check_pinned(stack: str, pyproject: Path = ROOT / "pyproject.toml") -> None:
    pins = lock_pins(stack)
    for where, requirement in requirements_for(stack, pyproject):
        name = lock_script.canonical_name(requirement.name)
        assert name in pins, (f"{where} entry {str(requirement)!r} has no pin in constraints/{stack}.txt: "
                              "run python scripts/lock.py")
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints/{stack}.txt pins {name}=={pins[name]}, outside pyproject's {str(requirement)!r}")


@pytest.mark.parametrize("stack", STACKS)
def test_every_dependency_is_pinned_within_its_range(stack: str) -> None:
    check_pinned(stack)


@pytest.mark.parametrize("stack", STACKS)
def test_lock_keeps_its_top_level_pins(stack: str) -> None:
    pins = lock_pins(stack)
    for line in (ROOT / "constraints" / f"{stack}.in").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            name = lock_script.canonical_name(requirement.name)
            assert name in pins and requirement.specifier.contains(pins[name]), (
                f"constraints/{stack}.in asks for {line!r}, the lock has {name}=={pins.get(name)}")


@pytest.mark.parametrize("stack", STACKS)
def test_lock_was_generated_from_the_current_inputs(stack: str) -> None:
    header = (ROOT / "constraints" / f"{stack}.txt").read_text()
    recorded = re.search(r"^# inputs: (\w+)$", header, flags=re.MULTILINE)
    assert recorded, f"constraints/{stack}.txt has no '# inputs:' line: it was not written by scripts/lock.py"
    assert recorded.group(1) == lock_script.inputs_hash(stack), (
        f"pyproject.toml or constraints/{stack}.in changed since constraints/{stack}.txt was generated: "
        "run python scripts/lock.py")


@pytest.mark.parametrize(("added", "message"), [('"a-package-nobody-locked>=1"', "has no pin"),
                                                ('"filelock>=99"', "outside pyproject's")])
def test_a_dependency_added_without_relocking_fails_the_check(tmp_path: Path, added: str, message: str) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '  "av>=12,<17",\n' in text
    (tmp_path / "pyproject.toml").write_text(text.replace('  "av>=12,<17",\n', f'  "av>=12,<17",\n  {added},\n'))
    with pytest.raises(AssertionError, match=message):
        check_pinned("paper", tmp_path / "pyproject.toml")


def test_known_breaking_releases_are_excluded() -> None:
    """A plain `pip install .` must not pull filelock 4 (lmms-eval 0.7.3 imports filelock._api)."""
    filelock = next(r for _, r in requirements_for("paper") if r.name == "filelock")
    assert not filelock.specifier.contains("4.0.0") and filelock.specifier.contains(lock_pins("paper")["filelock"])
