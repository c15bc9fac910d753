"""Resumable merges: a journal of completed shards (with sha256) kept in the temporary output directory.

A run writes `mergesmith-journal.jsonl` beside its shards: first the plan's fingerprint and the seed used
for random methods, then one line per completed shard. `--resume` adopts the temporary directory of an
interrupted run of the same plan, re-verifies every journaled shard by checksum and continues after the
last good one, so the final output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.io.manifest import file_sha256
from mergesmith.io.outdir import temp_siblings
from mergesmith.io.write import Shard
from mergesmith.plan.types import MergePlan

log = logging.getLogger("mergesmith")
JOURNAL = "mergesmith-journal.jsonl"


def fingerprint(plan: MergePlan, shards: list[Shard]) -> str:
    """Hash of everything that determines the output bytes: tensors, sources, parameters, layout, inputs."""
    h = hashlib.sha256()
    for m in plan.models:
        h.update(f"model {m.ref} {m.path} {m.lora}\n".encode())
        for d in (Path(m.path), *([Path(m.lora)] if m.lora else [])):
            for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
                st = f.stat()
                h.update(f"  {f} {st.st_size} {st.st_mtime_ns}\n".encode())
    for t in plan.tensors:
        h.update(repr((t.name, t.method, t.sources, t.base_index, t.params, t.per_model, t.shape)).encode())
        h.update(repr((t.compute_dtype, t.out_dtype, t.seed)).encode())
        if t.vocab is not None:  # embedding rows re-indexed onto a merged vocabulary
            h.update(t.vocab.digest().encode())
    for s in shards:
        h.update(s.header())
    return h.hexdigest()


@dataclass
class ResumeState:
    """What an interrupted run left that can be reused."""

    directory: Path
    seed: int
    done: list[tuple[str, str]] = field(default_factory=list)  # (shard filename, sha256), verified, in order


def _read_journal(directory: Path) -> tuple[dict, list[dict]] | None:
    try:
        lines = (directory / JOURNAL).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return None
    if not records or "fingerprint" not in records[0]:
        return None
    return records[0], [r for r in records[1:] if "shard" in r]


def find_resumable(out: Path, fp: str, shards: list[Shard]) -> ResumeState | None:
    """The interrupted run of this very plan beside `out`, with its shards verified; None if there is none."""
    sizes = {s.filename: len(s.header()) + sum(e.nbytes for e in s.entries) for s in shards}
    order = [s.filename for s in shards]
    for directory in temp_siblings(out, dead_only=True):
        found = _read_journal(directory)
        if found is None or found[0]["fingerprint"] != fp:
            continue
        head, records = found
        state = ResumeState(directory, int(head["seed"]))
        for i, rec in enumerate(records):
            name = rec["shard"]
            path = directory / name
            if (
                i >= len(order)
                or name != order[i]
                or not path.is_file()
                or path.stat().st_size != sizes[name]
            ):
                break
            if file_sha256(path) != rec["sha256"]:
                log.warning("resume: %s does not match its checksum; it will be written again", name)
                break
            state.done.append((name, rec["sha256"]))
        keep = {n for n, _ in state.done} | {JOURNAL}
        for f in directory.iterdir():  # a shard cut off mid-write, or anything after the verified prefix
            if f.name not in keep and f.is_file():
                f.unlink()
        return state
    return None


class Journal:
    """Appends one line per completed shard; the first line identifies the plan and the random seed."""

    def __init__(self, directory: Path, fp: str, seed: int, resumed: ResumeState | None) -> None:
        self.path = directory / JOURNAL
        if resumed is None:
            self.path.write_text(json.dumps({"fingerprint": fp, "seed": seed}) + "\n")
        else:  # rewrite it with only the verified shards
            lines = [json.dumps({"fingerprint": fp, "seed": seed})]
            lines += [json.dumps({"shard": n, "sha256": h}) for n, h in resumed.done]
            self.path.write_text("\n".join(lines) + "\n")

    def shard_done(self, filename: str, sha256: str, names: tuple[str, ...]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"shard": filename, "sha256": sha256, "tensors": len(names)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
