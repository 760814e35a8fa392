"""The package's names load on first use: the command line and accounting start without torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dptrain

ROOT = Path(__file__).resolve().parents[2]


def test_cli_accountants_and_audit_bounds_import_without_torch():
    code = ("import sys, dptrain.cli, accountants, audits; dptrain.cli.build_parser(); "
            "audits.epsilon_interval(10, 2, 10, 3); accountants.epsilon(1.0, 0.01, 100, 1e-5); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_public_name_resolves_to_the_object_it_names():
    for name in dptrain.__all__:
        value = getattr(dptrain, name)
        assert value is getattr(sys.modules[value.__module__], name)
    assert dptrain.validate.__module__ == "dptrain.validation"  # the function, not a module
    assert set(dptrain.__all__) <= set(dir(dptrain))


def test_submodules_load_on_access_and_unknown_names_fail():
    assert dptrain.diff2.__name__ == "dptrain.diff2"
    with pytest.raises(AttributeError, match="no attribute"):
        dptrain.not_a_name  # noqa: B018
