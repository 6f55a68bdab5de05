"""Every ``>>>`` example in byol3d's docstrings runs and prints what it shows.

The examples are the first thing a researcher copies; one that names a moved function or
forgets an import is a defect. Examples that need data on disk carry ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import byol3d

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(byol3d.__path__, "byol3d.") if m.name != "byol3d.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
