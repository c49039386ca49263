"""The distribution ships every subpackage, and kernels/ only as msft_fast.kernels."""
from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_listed_and_kernels_is_namespaced():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "msft_fast"))
        if "__init__.py" in files
    }
    assert on_disk | {"msft_fast.kernels"} == listed
    assert "kernels" not in listed  # a bare `kernels` would shadow the HF `kernels` package
    assert tool["package-dir"]["msft_fast.kernels"] == "kernels"


def test_users_import_the_loss_from_msft_fast_kernels():
    from msft_fast.kernels import TaskStats, fused_linear_cross_entropy

    assert callable(fused_linear_cross_entropy) and TaskStats._fields == ("loss_sum", "tokens", "correct")
