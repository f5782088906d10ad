"""The wheel must carry pgpool.django: ENGINE "pgpool.django" is imported from the installed package."""

from __future__ import annotations

import warnings

import pytest

from .support import ROOT


def test_the_package_list_includes_the_django_backend_and_its_command():
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' own notices about setup.cfg are not the point here
        packages = setupcfg.read_configuration(str(ROOT / "setup.cfg"), find_others=True)["options"]["packages"]
    expected = {"pgpool.django", "pgpool.django.management", "pgpool.django.management.commands"}
    assert expected <= set(packages), packages
