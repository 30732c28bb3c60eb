"""The public API: __all__ resolves, and light entry points do not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hubarches


def test_every_public_name_resolves() -> None:
    for name in hubarches.__all__:
        assert getattr(hubarches, name) is not None, name
    assert set(dir(hubarches)) >= set(hubarches.__all__)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="does_not_exist"):
        hubarches.does_not_exist  # noqa: B018


def test_the_command_line_starts_without_torch() -> None:
    """`hubarches --help`, `list` and `info` should not wait for torch to import."""
    code = "import sys, hubarches, hubarches.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
