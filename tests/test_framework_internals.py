"""Every private framework name the project uses still exists in the installed libraries."""

from __future__ import annotations

import importlib
from functools import reduce
from pathlib import Path

import pytest

from mit_lightning.framework_internals import INTERNALS

PACKAGE = Path(__file__).resolve().parents[1] / "mit_lightning"


def resolve(owner: str):
    module, _, qualified_name = owner.partition(":")
    return reduce(getattr, filter(None, qualified_name.split(".")), importlib.import_module(module))


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: f"{internal.owner}.{internal.attribute}")
def test_the_private_name_still_exists(internal):
    owner = resolve(internal.owner)
    holder = owner() if internal.on_instance else owner
    assert hasattr(holder, internal.attribute), f"{internal.owner}.{internal.attribute} is gone: see {internal.used_in}"


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: f"{internal.used_in}:{internal.attribute}")
def test_the_listed_file_uses_it(internal):
    source = (PACKAGE / internal.used_in).read_text()
    assert f".{internal.attribute}" in source or f"def {internal.attribute}(" in source
