"""Small process-level helpers in mergesmith._util."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_malloc_tuning_applies_on_linux_glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = "from mergesmith._util import keep_freed_memory_in_heap as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
