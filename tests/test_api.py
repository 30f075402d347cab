"""The Python API: every exported name resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import bnwd_cli


def test_every_exported_name_resolves() -> None:
    for name in bnwd_cli.__all__:
        assert getattr(bnwd_cli, name) is not None, name
    assert callable(bnwd_cli.param_groups)
    assert callable(bnwd_cli.analyze_run)


def test_import_does_not_load_torch() -> None:
    code = "import sys, bnwd_cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
