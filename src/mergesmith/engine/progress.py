"""Progress display: tensors done, throughput in GB/s and ETA (tqdm on stderr); silent when quiet."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, total_tensors: int, total_bytes: int, quiet: bool) -> None:
        self.start = time.perf_counter()
        self.bytes = 0
        self.total_bytes = total_bytes
        self._bar: Any = None
        if not quiet:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_tensors, unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=True
            )

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self._bar.set_postfix_str(f"{self.bytes / elapsed / 1e9:.2f} GB/s", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
