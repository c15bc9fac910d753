"""Follow a MergePlan: a loader thread reads and casts inputs ahead, the caller's thread merges,
a writer thread streams results into shards. Queues are bounded, so memory holds a few tensors."""

from __future__ import annotations

import functools
import gc
import logging
import os
import queue
import random
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergesmith.engine.progress import Progress
from mergesmith.errors import MergesmithError, PlanError
from mergesmith.io.read import ModelReader, RawTensor, open_model
from mergesmith.io.write import ShardWriter
from mergesmith.methods import registry, task_vector_fast
from mergesmith.methods.spec import ArrayInputs, MergeInputs
from mergesmith.plan.types import MergePlan, TensorPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergesmith")
_DONE = object()


@dataclass(frozen=True)
class ExecOptions:
    device: str = "cpu"
    read_ahead: int = 2  # units loaded ahead of the one being merged
    quiet: bool = False
    random_seed: int | None = None
    fallback_seed: int | None = None  # seed for random methods when random_seed is None (kept on resume)
    unit_bytes: int = 64 * 10**6  # input bytes per row range of a split elementwise tensor
    inflight_bytes: int = 4 * 10**8  # inputs + outputs held between loader and writer
    num_threads: int | None = None  # torch's compute threads (None: chosen from the method and device)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _load_inputs(tp: TensorPlan, readers: list[ModelReader]) -> list[torch.Tensor]:
    """Read the sources of one output tensor in their stored dtype (conversion happens at compute time)."""
    return [readers[src.model].read(src.name, src.rows) for src in tp.sources]


# Row chunks of about this many elements keep an elementwise merge's working set in the CPU cache.
CHUNK_ELEMENTS = 1 << 18


# Compute dtypes that hold every value of a stored dtype exactly (a cast there and back is the identity).
_HOLDS = {"bfloat16": ("float32", "float64"), "float16": ("float32", "float64"), "float32": ("float64",)}


def _unchanged(tp: TensorPlan, stored: list[str]) -> bool:
    """A passthrough with no scale of a tensor already in the output dtype (`stored`: the source dtypes):
    the result is the input bit for bit, so both casts are skipped (frankenmerges then cost only the read
    and the write)."""
    if tp.method != "passthrough" or tp.vocab is not None or len(stored) != 1:
        return False
    if dict(tp.per_model[0]).get("scale") is not None:
        return False
    return stored[0] == tp.out_dtype and (
        tp.compute_dtype == stored[0] or tp.compute_dtype in _HOLDS.get(stored[0], ())
    )


def _plain(tp: TensorPlan, readers: list[Any]) -> bool:
    """Every source is a whole stored tensor of a safetensors file (no adapter, no vocabulary rework), so
    its bytes can be used as they are."""
    return tp.vocab is None and all(
        type(readers[s.model]) is ModelReader
        and readers[s.model].index.format == "safetensors"
        and s.rows is None
        for s in tp.sources
    )


def _raw(tp: TensorPlan, readers: list[Any]) -> bool:
    """The output tensor is its source's stored bytes (an unchanged passthrough, or a copy of a non-float
    tensor) read from safetensors files: it is moved as bytes, with no torch at all."""
    if tp.method not in ("copy", "passthrough") or not _plain(tp, readers):
        return False
    stored = [readers[s.model].index.tensors[s.name].dtype for s in tp.sources]
    return tp.method == "copy" or _unchanged(tp, stored)


def _kernel(tp: TensorPlan, readers: list[Any], device: str) -> bool:
    """The method's fused CPU kernel can run on the stored bytes as they are (inputs already in the compute
    and output dtype, bfloat16 or float32): torch is only needed if the kernel declines."""
    if tp.method == "copy" or device != "cpu" or not _plain(tp, readers):
        return False
    if registry.get(tp.method).fused is None or tp.compute_dtype not in ("bfloat16", "float32"):
        return False
    stored = {readers[s.model].index.tensors[s.name].dtype for s in tp.sources}
    return stored == {tp.compute_dtype} == {tp.out_dtype} and task_vector_fast.enabled()


def _tensor_seed(tp: TensorPlan, fallback_seed: int) -> int:
    """The seed of a random method's generator for this tensor: the plan's, or one derived from the run's
    seed and the tensor's name (so the result does not depend on the order tensors are merged in)."""
    return tp.seed if tp.seed is not None else zlib.crc32(f"{fallback_seed}:{tp.name}".encode())


def _array_inputs(
    tp: TensorPlan, arrays: Any, out: Any, threads: int | None, fallback_seed: int, shape: tuple[int, ...]
) -> ArrayInputs:
    return ArrayInputs(
        arrays=tuple(arrays),
        out=out,
        dtype=tp.compute_dtype,
        base_index=tp.base_index,
        params=dict(tp.params),
        per_model=tuple(dict(p) for p in tp.per_model),
        name=tp.name,
        threads=threads,
        seed=_tensor_seed(tp, fallback_seed) if registry.get(tp.method).random else None,
        shape=shape,
    )


def _no_claim(nbytes: int) -> None:
    """The claim for units whose kernel writes into a buffer of its own."""
    return None


def _run_kernel(
    tp: TensorPlan,
    parts: list[RawTensor],
    threads: int,
    fallback_seed: int,
    claim: Callable[[int], memoryview | None] = _no_claim,
) -> RawTensor | None:
    """The method's fused kernel over the stored bytes, straight into the output's place in its shard when
    `claim` can map it (else into a new buffer); None when the kernel declines."""
    import numpy as np

    kind = np.uint16 if tp.compute_dtype == "bfloat16" else np.float32
    arrays = [np.frombuffer(p.data, dtype=kind) for p in parts]
    nbytes = arrays[0].nbytes
    place = claim(nbytes) if nbytes else None
    out = np.frombuffer(place, dtype=kind) if place is not None else np.empty(arrays[0].size, dtype=kind)
    inputs = _array_inputs(tp, arrays, out, threads, fallback_seed, parts[0].shape)
    if not registry.get(tp.method).fused(inputs):
        return None
    return RawTensor(tp.out_dtype, parts[0].shape, memoryview(out).cast("B"), in_place=place is not None)


def _pass_raw(tp: TensorPlan, parts: list[RawTensor]) -> RawTensor:
    """A raw unit's output: its one source, or for a copy the first of several sources that must agree."""
    first = parts[0]
    for other in parts[1:]:
        if other.dtype != first.dtype or other.shape != first.shape or other.data != first.data:
            raise _copies_differ(tp)
    return first


def _copies_differ(tp: TensorPlan) -> PlanError:
    return PlanError(f"non-float tensor {tp.name!r} differs between the input models; cannot merge it")


def _merge(
    tp: TensorPlan,
    tensors: list[torch.Tensor],
    fallback_seed: int,
    device: str,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    import torch

    if tp.method == "copy":
        first = tensors[0]
        for other in tensors[1:]:
            if other.dtype != first.dtype or not torch.equal(other, first):
                raise _copies_differ(tp)
        return first
    if _unchanged(tp, [str(t.dtype).removeprefix("torch.") for t in tensors]):
        return tensors[0]
    if tp.vocab is not None:
        tensors = tp.vocab.align(tensors)
    spec = registry.get(tp.method)
    compute = getattr(torch, tp.compute_dtype)
    out_dtype = getattr(torch, tp.out_dtype)
    gen = None
    if spec.random:
        # A CPU generator on every device: the same seed gives the same masks on CPU and GPU.
        gen = torch.Generator()
        gen.manual_seed(_tensor_seed(tp, fallback_seed))

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

    # The expected shape of this piece: the whole tensor, or rows [start, stop) of it.
    shape = tp.shape if rows is None or not tp.shape else (rows[1] - rows[0], *tp.shape[1:])
    numel = tensors[0].numel()
    with torch.no_grad():
        result = None
        # A method's fused CPU kernel takes the whole piece in one pass, when the inputs need no cast.
        if spec.fused is not None and device == "cpu" and all(t.dtype == compute for t in tensors):
            out = torch.empty(shape, dtype=compute)
            arrays = task_vector_fast.tensor_arrays(tensors, out)
            if arrays is not None and spec.fused(_array_inputs(tp, *arrays, None, fallback_seed, shape)):
                result = out
        if result is None:
            if spec.elementwise and len(tensors) > 1 and tensors[0].dim() > 0 and numel > CHUNK_ELEMENTS:
                result = torch.empty(shape, dtype=out_dtype, device=device)
                step = max(1, CHUNK_ELEMENTS // max(1, numel // shape[0]))
                for start in range(0, shape[0], step):
                    result[start : start + step] = run([t[start : start + step] for t in tensors])
            else:
                result = run(tensors)
    if tuple(result.shape) != shape:
        raise MergesmithError(
            f"method {tp.method!r} returned shape {tuple(result.shape)} for {tp.name!r}, expected {shape}"
        )
    return result.to(dtype=out_dtype)


@dataclass(frozen=True)
class Unit:
    """A piece of work: rows [start, stop) of one output tensor (the whole tensor when not split)."""

    tp: TensorPlan
    start: int
    stop: int
    whole: bool
    raw: bool = False  # moved as stored bytes (see _raw)
    kernel: bool = False  # read as bytes for the method's fused kernel (see _kernel)


def splittable(tp: TensorPlan) -> bool:
    """Row ranges of this tensor can be read, merged and written independently."""
    if tp.method == "copy" or tp.vocab is not None or not tp.shape:
        return False
    return registry.get(tp.method).elementwise


def plan_units(
    plan: MergePlan, unit_bytes: int, skip: set[str], readers: list[Any], device: str = "cpu"
) -> list[Unit]:
    """Split large elementwise tensors into row ranges of about `unit_bytes` of input each."""
    units = []
    for tp in plan.tensors:
        if tp.name in skip:
            continue
        rows = tp.shape[0] if tp.shape else 0
        raw = _raw(tp, readers)
        kernel = not raw and _kernel(tp, readers, device)
        in_bytes = sum(_nbytes(tp, s, readers) for s in tp.sources)
        ranged = all(hasattr(readers[s.model], "read_range") for s in tp.sources)
        if not (splittable(tp) and ranged and rows > 1 and in_bytes > unit_bytes):
            units.append(Unit(tp, 0, rows, True, raw, kernel))
            continue
        step = max(1, int(rows * unit_bytes / in_bytes))
        units += [Unit(tp, r, min(rows, r + step), False, raw, kernel) for r in range(0, rows, step)]
    return units


def _nbytes(tp: TensorPlan, src: Any, readers: list[Any]) -> int:
    info = readers[src.model].index.tensors[src.name]
    if src.rows is None or not info.shape:
        return info.nbytes
    return info.nbytes // max(1, info.shape[0]) * src.rows


def _unit_bytes(u: Unit, readers: list[Any]) -> int:
    """Memory a unit holds while in flight: its inputs plus its output, in stored/output dtypes."""
    rows = max(1, u.tp.shape[0]) if u.tp.shape else 1
    frac = (u.stop - u.start) / rows if u.tp.shape else 1.0
    return int(frac * (sum(_nbytes(u.tp, s, readers) for s in u.tp.sources) + u.tp.out_nbytes))


def _read_unit(u: Unit, readers: list[Any]) -> list[torch.Tensor] | list[RawTensor]:
    if u.raw or u.kernel:
        start, stop = (None, None) if u.whole else (u.start, u.stop)
        return [readers[s.model].read_raw(s.name, start, stop) for s in u.tp.sources]
    if u.whole:
        return _load_inputs(u.tp, readers)
    return [readers[s.model].read_range(s.name, u.start, u.stop) for s in u.tp.sources]


class Budget:
    """Bytes in flight between loader and writer; a unit larger than the budget still runs, alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + n > self.capacity:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


# 0.5 ms: DARE-TIES took 10.1-10.9 s instead of 10.6-11.6 s on the 1.1B bench models (4 alternating pairs);
# methods that keep both cores busy (DELLA) or leave one to the other threads (linear) did not change.
SWITCH_INTERVAL = 0.0005


def execute(plan: MergePlan, writer: ShardWriter, opts: ExecOptions) -> float:
    """Run every tensor of the plan not yet written through the writer; return the elapsed seconds.

    Three threads: the loader reads units ahead (bounded by a byte budget), this thread merges, the writer
    streams results into the shards. Tensors the writer already holds (resume) are skipped unread."""
    # The heap holds the long-lived objects of the libraries loaded so far; frozen, they are left out of
    # the collections the merge's own allocations trigger. Those make few cycles, and the libraries
    # loaded on first use (torch, numba: hundreds of thousands of objects each) should not trigger a
    # collection every 700 allocations while they load, so collections are also rarer.
    enabled = gc.isenabled()
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    gc.enable()
    # The threads hand the GIL to each other around every kernel call, read and write; a thread that wants
    # it back waits up to the switch interval (5 ms by default) while another runs Python code.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        return _execute(plan, writer, opts)
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        if not enabled:
            gc.disable()


def _execute(plan: MergePlan, writer: ShardWriter, opts: ExecOptions) -> float:
    readers = [open_model(m.path, m.lora) for m in plan.models]
    fallback_seed = (
        opts.fallback_seed if opts.fallback_seed is not None else random.SystemRandom().randrange(2**31)
    )
    if (
        any(registry.get(t.method).random for t in plan.tensors if t.method != "copy")
        and opts.random_seed is None
    ):
        log.warning("random merge method without --random-seed: this run used seed %d", fallback_seed)
    budget = Budget(opts.inflight_bytes)
    units = plan_units(plan, opts.unit_bytes, writer.done_names, readers, opts.device)
    # A merge that only moves stored bytes (a frankenmerge) or runs fused kernels on them never loads torch.
    n_threads = _compute_threads(plan, opts)
    torch_threads: list[int] = []  # torch's thread count before this merge set it, once torch is in use

    def use_torch() -> None:
        if not torch_threads:
            gc.disable()  # torch's import makes hundreds of thousands of objects: no collections meanwhile,
            import torch

            gc.freeze()  # and none of them in the collections the merge's own allocations trigger
            gc.enable()
            torch_threads.append(torch.get_num_threads())
            if n_threads is not None:
                torch.set_num_threads(n_threads)

    if not all(u.raw or u.kernel for u in units):
        use_torch()
    # Kernels write straight into the shard files only when they run on every core: the write() copy they
    # spare then competes with them for the cores. With a core left to the reader and writer threads
    # (elementwise methods), that copy costs no wall time there, while the page faults of writing
    # through a map would land on the compute thread (linear measured 8.8-12.4 s instead of 6.2 s).
    cores = os.cpu_count() or 1
    in_place = (n_threads or cores) >= cores
    loaded: queue.Queue[Any] = queue.Queue(maxsize=max(1, opts.read_ahead))
    merged: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    remaining = [u.tp for u in units if u.whole or u.stop == u.tp.shape[0]]
    progress = Progress(len(remaining), sum(t.out_nbytes for t in remaining), opts.quiet)

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
            for u in units:
                cost = _unit_bytes(u, readers)
                if stop.is_set() or not budget.acquire(cost, stop):
                    return
                hand_over((u, cost, _read_unit(u, readers)))
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
            u, cost, tensor = item
            try:
                writer.write(u.tp.name, tensor)
                del tensor
                budget.release(cost)
                if u.whole or u.stop == u.tp.shape[0]:
                    progress.advance(u.tp.out_nbytes)
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
            u, cost, tensors = item
            result = None
            if u.raw:
                result = _pass_raw(u.tp, tensors)
            elif u.kernel:
                result = _run_kernel(
                    u.tp,
                    tensors,
                    n_threads or cores,
                    fallback_seed,
                    functools.partial(writer.claim, u.tp.name, u.start) if in_place else _no_claim,
                )
            if result is None:
                use_torch()
                parts = [p.to_torch() if isinstance(p, RawTensor) else p for p in tensors]
                result = _merge(u.tp, parts, fallback_seed, opts.device, rows=(u.start, u.stop))
                del parts
                if result.device.type != "cpu":
                    result = result.to("cpu")
            del tensors
            merged.put((u, cost, result))
            del result
        merged.put(_DONE)
        threads[1].join()
        if write_error:
            raise write_error[0]
    finally:
        stop.set()
        if threads[1].is_alive():
            merged.put(_DONE)
        progress.close()
        threads[0].join()  # the loader sees stop after its current read; only then close its files
        for r in readers:
            r.close()
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads[0])
    return progress.elapsed


def _compute_threads(plan: MergePlan, opts: ExecOptions) -> int | None:
    """Threads for compute (torch's and the kernels'); None leaves torch's default (every core).
    Elementwise merges are memory-bound: on the CPU they leave a core to the reader and writer threads.
    Whole-tensor methods (selection, random masks, ranking) are compute-bound and get every core."""
    if opts.num_threads:
        return opts.num_threads
    if registry.get(plan.method).elementwise and opts.device == "cpu":
        return max(1, (os.cpu_count() or 2) - 1)
    return None
