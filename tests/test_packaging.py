"""pyproject.toml must describe an app that Flower's runtime installer can resolve."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def test_requires_python_admits_no_version_that_flwr_rejects() -> None:
    # A SuperLink with runtime dependency installation on `uv sync`s the app, and uv
    # refuses the whole app when one allowed Python cannot install flwr.
    with open(ROOT / "pyproject.toml", "rb") as f:
        ours = SpecifierSet(tomllib.load(f)["project"]["requires-python"])
    flwr = SpecifierSet(importlib.metadata.metadata("flwr")["Requires-Python"])
    versions = [f"3.{minor}" for minor in range(8, 20)]
    assert [v for v in versions if v in ours and v not in flwr] == []
