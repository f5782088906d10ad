"""The API reference names every public name, each pool parameter has its line, README starts with
how to install."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pgpool

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_reference_names_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in pgpool.__all__ if not re.search(rf"pgpool\.{name}\b", text)]
    assert missing == []


def test_every_pool_parameter_has_a_line_in_the_docstring():
    documented = set(re.findall(r":param (\w+):", pgpool.ConnectionPool.__doc__ or ""))
    parameters = set(inspect.signature(pgpool.ConnectionPool.__init__).parameters) - {"self"}
    assert parameters - documented == set()


def test_every_stats_field_is_described():
    doc = pgpool.PoolStats.__doc__ or ""
    assert [field for field in pgpool.PoolStats.__annotations__ if f"``{field}``" not in doc] == []


def test_the_api_reference_hides_the_private_parts_of_the_pools():
    text = (ROOT / "docs" / "api.md").read_text()
    assert "automodule:: pgpool\n" not in text  # which documented Lending, Returning... as bases
    for part in ("Lending", "Returning", "Maintenance", "PoolCore"):
        assert part not in text


def test_readme_says_how_to_install_before_anything_else():
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), flags=re.M)
    assert headings[0] == "Install"
