"""Follow a MergePlan: a loader thread reads and casts inputs ahead, the caller's thread merges,
a writer thread streams results into shards. Queues are bounded, so memory holds a few tensors."""

from __future__ import annotations

import logging
import queue
import random
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergesmith.engine.progress import Progress
from mergesmith.errors import MergesmithError, PlanError
from mergesmith.io.read import ModelReader, open_model
from mergesmith.io.write import ShardWriter
from mergesmith.methods import registry
from mergesmith.methods.spec import MergeInputs
from mergesmith.plan.types import MergePlan, TensorPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergesmith")
_DONE = object()


@dataclass(frozen=True)
class ExecOptions:
    device: str = "cpu"
    read_ahead: int = 2  # tensors loaded ahead of the one being merged
    quiet: bool = False
    random_seed: int | None = None


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _load_inputs(tp: TensorPlan, readers: list[ModelReader]) -> list[torch.Tensor]:
    """Read the sources of one output tensor in their stored dtype (conversion happens at compute time)."""
    return [readers[src.model].read(src.name, src.rows) for src in tp.sources]


# Row chunks of about this many elements keep an elementwise merge's working set in the CPU cache.
CHUNK_ELEMENTS = 1 << 18


def _merge(tp: TensorPlan, tensors: list[torch.Tensor], fallback_seed: int, device: str) -> torch.Tensor:
    import torch

    if tp.method == "copy":
        first = tensors[0]
        for other in tensors[1:]:
            if other.dtype != first.dtype or not torch.equal(other, first):
                raise PlanError(
                    f"non-float tensor {tp.name!r} differs between the input models; cannot merge it"
                )
        return first
    if tp.vocab is not None:
        tensors = tp.vocab.align(tensors)
    spec = registry.get(tp.method)
    compute = getattr(torch, tp.compute_dtype)
    out_dtype = getattr(torch, tp.out_dtype)
    gen = None
    if spec.random:
        gen = torch.Generator(device=device)
        seed = tp.seed if tp.seed is not None else zlib.crc32(f"{fallback_seed}:{tp.name}".encode())
        gen.manual_seed(seed)

    def run(parts: list[torch.Tensor]) -> torch.Tensor:
        inputs = MergeInputs(
            tensors=tuple(t.to(device=device, dtype=compute) for t in parts),
            base_index=tp.base_index,
            params=dict(tp.params),
            per_model=tuple(dict(p) for p in tp.per_model),
            name=tp.name,
            generator=gen,
        )
        return spec.fn(inputs)

    numel = tensors[0].numel()
    with torch.no_grad():
        if spec.elementwise and len(tensors) > 1 and tensors[0].dim() > 0 and numel > CHUNK_ELEMENTS:
            result = torch.empty(tp.shape, dtype=out_dtype, device=device)
            rows = max(1, CHUNK_ELEMENTS // max(1, numel // tp.shape[0]))
            for start in range(0, tp.shape[0], rows):
                part = run([t[start : start + rows] for t in tensors])
                result[start : start + rows] = part
        else:
            result = run(tensors)
    if tuple(result.shape) != tp.shape:
        raise MergesmithError(
            f"method {tp.method!r} returned shape {tuple(result.shape)} for {tp.name!r}, expected {tp.shape}"
        )
    return result.to(dtype=out_dtype)


def execute(plan: MergePlan, writer: ShardWriter, opts: ExecOptions) -> float:
    """Run every tensor of the plan through the writer; return the elapsed seconds."""
    readers = [open_model(m.path, m.lora) for m in plan.models]
    fallback_seed = random.SystemRandom().randrange(2**31)
    if (
        any(registry.get(t.method).random for t in plan.tensors if t.method != "copy")
        and opts.random_seed is None
    ):
        log.warning("random merge method without --random-seed: this run used seed %d", fallback_seed)
    loaded: queue.Queue[Any] = queue.Queue(maxsize=max(1, opts.read_ahead))
    merged: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()
    progress = Progress(len(plan.tensors), plan.bytes_out, opts.quiet)

    def hand_over(item: Any) -> None:
        # Never block for good: once stop is set nobody may be reading the queue any more.
        while not stop.is_set():
            try:
                loaded.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def loader() -> None:
        try:
            for tp in plan.tensors:
                if stop.is_set():
                    return
                hand_over((tp, _load_inputs(tp, readers)))
            hand_over(_DONE)
        except BaseException as exc:  # handed to the main thread, which reports it
            hand_over(_Failure(exc))

    write_error: list[BaseException] = []

    def writer_loop() -> None:
        while True:
            item = merged.get()
            if item is _DONE:
                return
            if write_error:
                continue
            name, tensor, nbytes = item
            try:
                writer.write(name, tensor)
                progress.advance(nbytes)
            except BaseException as exc:
                write_error.append(exc)
                stop.set()

    threads = [
        threading.Thread(target=loader, daemon=True),
        threading.Thread(target=writer_loop, daemon=True),
    ]
    for th in threads:
        th.start()
    try:
        while True:
            try:
                item = loaded.get(timeout=0.1)
            except queue.Empty:
                # A failed write stops the loader, which then hands over nothing: check, don't wait forever.
                if write_error:
                    raise write_error[0] from None
                continue
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.exc
            if write_error:
                raise write_error[0]
            tp, tensors = item
            result = _merge(tp, tensors, fallback_seed, opts.device)
            del tensors
            if result.device.type != "cpu":
                result = result.to("cpu")
            merged.put((tp.name, result, tp.out_nbytes))
            del result
        merged.put(_DONE)
        threads[1].join()
        if write_error:
            raise write_error[0]
    finally:
        stop.set()
        if threads[1].is_alive():
            try:
                merged.put_nowait(_DONE)
            except queue.Full:
                pass
        progress.close()
        threads[0].join()  # the loader sees stop after its current read; only then close its files
        for r in readers:
            r.close()
    return progress.elapsed
