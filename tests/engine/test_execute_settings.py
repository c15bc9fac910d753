"""Process-wide settings the executor changes for the length of a merge, and gives back afterwards."""

from __future__ import annotations

import gc
import sys

import pytest

from mergesmith.engine import execute as ex


@pytest.mark.parametrize("fails", [False, True])
def test_switch_interval_and_gc_are_set_for_the_merge_and_restored(monkeypatch, fails) -> None:
    seen = {}

    def fake(plan, writer, opts):
        seen["interval"] = sys.getswitchinterval()
        seen["threshold"] = gc.get_threshold()[0]
        if fails:
            raise RuntimeError("merge failed")
        return 1.5

    monkeypatch.setattr(ex, "_execute", fake)
    before_interval, before_threshold = sys.getswitchinterval(), gc.get_threshold()
    if fails:
        with pytest.raises(RuntimeError, match="merge failed"):
            ex.execute(None, None, None)  # type: ignore[arg-type]
    else:
        assert ex.execute(None, None, None) == 1.5  # type: ignore[arg-type]
    assert seen == {"interval": pytest.approx(ex.SWITCH_INTERVAL), "threshold": 100_000}
    assert sys.getswitchinterval() == before_interval and gc.get_threshold() == before_threshold
