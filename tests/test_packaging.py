"""Installing an extra never replaces the user's torch: no optional dependency of the project needs
torch or torchvision (which would pull a torch of its own: torchvision pins one), checked on the
installed distributions' own requirement lists, transitively."""

import re
import tomllib
from importlib import metadata

import pytest

from tests.conftest import ROOT

EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
TORCH_PACKAGES = {"torch", "torchvision"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """Every installed distribution these need, by their metadata (extras of theirs not followed)."""
    seen, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        stack += [_name(r) for r in requires if "extra ==" not in r]
    return seen


@pytest.mark.parametrize("extra", ["export", "backbones", "photos", "tensorboard"])
def test_an_extra_needs_no_torch_of_its_own(extra):
    names = [_name(r) for r in EXTRAS[extra]]
    for name in names:
        metadata.version(name)  # installed by the test extra, so its requirements can be read
    assert not _closure(names) & TORCH_PACKAGES, f"the {extra} extra would pull torch or torchvision"


def test_the_closure_follows_requirements():
    assert "numpy" in _closure(["onnx"]) and "torch" in _closure(["ldcache"])  # the checker sees dependencies
