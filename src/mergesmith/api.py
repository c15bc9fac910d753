"""run_merge: config -> plan -> execute -> output directory. The CLI and every tool go through here."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergesmith.config.load import load_config, load_config_text
from mergesmith.config.schema import MergeConfig
from mergesmith.errors import MergesmithError, OutputError, PlanError
from mergesmith.options import MergeOptions
from mergesmith.plan.build import PlanOptions, build_plan
from mergesmith.plan.types import MergePlan

if TYPE_CHECKING:
    from mergesmith.engine.execute import ExecOptions

log = logging.getLogger("mergesmith")


@dataclass(frozen=True)
class MergeResult:
    """What a finished run produced."""

    out_path: Path | None
    plan: MergePlan
    seconds: float
    files: tuple[str, ...]


def as_config(config: MergeConfig | str | Path | dict) -> MergeConfig:
    """Accept a MergeConfig, a YAML path, YAML text or a plain dict."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        import yaml

        return load_config_text(yaml.safe_dump(config))
    if isinstance(config, Path) or (
        "\n" not in str(config)
        and (Path(str(config)).suffix in (".yml", ".yaml") or Path(str(config)).is_file())
    ):
        return load_config(config)
    return load_config_text(str(config))


def check_device(device: str) -> None:
    """Raise MergesmithError unless torch can compute on `device` here (before any output is made)."""
    if device == "cpu":  # always there; and a merge that only copies bytes never imports torch
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MergesmithError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergesmithError(f"device {device!r} asked for, but no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergesmithError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MergesmithError(f"device {device!r} asked for, but MPS is not available here")
    elif dev.type != "cpu":
        raise MergesmithError(f"device {device!r} is not supported: use cpu, cuda, cuda:N, mps or auto")


def exec_options(plan: MergePlan, options: MergeOptions) -> ExecOptions:
    """Execution settings for a plan; with --max-memory, refuse up front a tensor that cannot fit."""
    from mergesmith._util import human_bytes
    from mergesmith.engine.execute import ExecOptions, splittable

    unit, inflight = 64 * 10**6, 4 * 10**8
    if options.max_memory is not None:
        budget = options.max_memory
        unit, inflight = max(1, min(unit, budget // 8)), max(1, budget // 2)
        worst, need = None, 0
        for t in plan.tensors:
            if splittable(t):
                continue
            # A whole-tensor method holds its inputs and a few float32 working copies of the tensor.
            numel = t.out_nbytes // max(1, _itemsize(t.out_dtype))
            est = (len(t.sources) + 2) * numel * 4
            if est > need:
                worst, need = t, est
        if worst is not None and need > budget:
            raise PlanError(
                f"--max-memory {human_bytes(budget)} is too small: tensor {worst.name!r} ({list(worst.shape)}) "
                f"needs about {human_bytes(need)} with merge method {worst.method!r}, which cannot split it "
                "into row chunks; raise --max-memory"
            )
    return ExecOptions(
        device=options.resolved_device(),
        read_ahead=options.read_ahead,
        num_threads=options.num_threads,
        quiet=options.quiet,
        random_seed=options.random_seed,
        unit_bytes=unit,
        inflight_bytes=inflight,
    )


def _itemsize(dtype: str) -> int:
    from mergesmith._util import dtype_itemsize

    return dtype_itemsize(dtype)


def _write_side_files(plan: MergePlan, dest: Path, copy_tokenizer: bool) -> list[str]:
    """The donor's small files, then the merged tokenizer or chat template when the config asks for one."""
    from mergesmith.io.outdir import copy_side_files

    out_tok = plan.tokenizer
    keep_donor_tokenizer = copy_tokenizer and (out_tok is None or not out_tok.replaces_donor_files)
    other = plan.tokenizer_donor
    if other is not None and other != plan.donor and keep_donor_tokenizer:
        # Embeddings were truncated to a smaller vocabulary: take the tokenizer of a model that has it.
        copied = copy_side_files(plan.models[plan.donor].path, dest, False)
        copied += copy_side_files(plan.models[other].path, dest, True, tokenizer_only=True)
    else:
        copied = copy_side_files(plan.models[plan.donor].path, dest, keep_donor_tokenizer)
    if out_tok is not None:
        copied += [f for f in out_tok.save(dest, copy_tokenizer) if f not in copied]
    return copied


def plan_merge(config: MergeConfig | str | Path | dict, options: MergeOptions | None = None) -> MergePlan:
    """Validate the config and build the full plan (reads only file headers)."""
    options = options or MergeOptions()
    cfg = as_config(config)
    return build_plan(
        cfg,
        PlanOptions(
            allow_crimes=options.allow_crimes,
            random_seed=options.random_seed,
            cache_dir=options.transformers_cache,
            lora_merge_cache=None if options.dry_run else options.lora_merge_cache,
        ),
    )


def run_merge(
    config: MergeConfig | str | Path | dict, out_path: str | Path, options: MergeOptions | None = None
) -> MergeResult:
    """Merge as the config says and write a Hugging Face model directory at out_path.

    Args:
        config: a MergeConfig, a path to a YAML file, YAML text, or a dict of the same shape.
        out_path: the output directory; built in a temporary sibling and renamed into place at the end.
        options: run options (device, shard size, seed, ...).

    Returns:
        A MergeResult with the plan and the time taken.

    Raises:
        MergesmithError: any problem with the config, the inputs or the output, with a readable message.
    """
    from mergesmith.io.outdir import check_target

    options = options or MergeOptions()
    cfg = as_config(config)
    out = Path(out_path)
    if not options.dry_run:
        check_target(out.absolute(), options.overwrite)  # fail before any planning work
        check_device(options.resolved_device())
    plan = plan_merge(cfg, options)
    if options.dry_run:
        return MergeResult(None, plan, 0.0, ())
    target = out.resolve()
    for m in plan.models:
        for src in (Path(m.path).resolve(), *([Path(m.lora).resolve()] if m.lora else [])):
            if target == src or target in src.parents:
                raise OutputError(
                    f"output path {out} holds input model {m.ref}; writing there would delete it: "
                    "choose another output directory"
                )
    return _run_planned(cfg, plan, out, options)


def _run_planned(cfg: MergeConfig, plan: MergePlan, out: Path, options: MergeOptions) -> MergeResult:
    """Execute a checked plan into `out` (atomically, resumably) and write the metadata."""
    from mergesmith.engine.execute import execute
    from mergesmith.engine.resume import Journal, find_resumable, fingerprint
    from mergesmith.io.outdir import atomic_dir
    from mergesmith.io.write import OutEntry, ShardWriter, layout_shards

    entries = [OutEntry(t.name, t.out_dtype, t.shape) for t in plan.tensors]
    shards = layout_shards(entries, options.out_shard_size)
    exec_opts = exec_options(plan, options)
    fp = fingerprint(plan, shards)
    resumed = find_resumable(out, fp, shards) if options.resume else None
    if options.resume:
        done = len(resumed.done) if resumed else 0
        log.warning("resume: %d of %d shards already complete and verified", done, len(shards))
    seed = resumed.seed if resumed else random.SystemRandom().randrange(2**31)
    with atomic_dir(
        out, options.overwrite, adopt=resumed.directory if resumed else None, keep_on_interrupt=options.resume
    ) as tmp:
        journal = Journal(tmp, fp, seed, resumed)
        writer = ShardWriter(
            tmp,
            shards,
            start_shard=len(resumed.done) if resumed else 0,
            on_shard_done=journal.shard_done,
            done_hashes=dict(resumed.done) if resumed else None,
        )
        try:
            seconds = execute(plan, writer, dataclasses.replace(exec_opts, fallback_seed=seed))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        journal.remove()
        seed_used = options.random_seed if options.random_seed is not None else seed
        copied = _write_metadata(tmp, cfg, plan, options, writer.hashes, seed_used)
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    log.info("wrote %s (%d tensors, %d shards, %s)", out, len(plan.tensors), len(shards), ", ".join(copied))
    return MergeResult(out, plan, seconds, files)


def _write_metadata(
    tmp: Path, cfg: MergeConfig, plan: MergePlan, options: MergeOptions, hashes: dict[str, str], seed: int
) -> list[str]:
    """Everything beside the weights: side files, config.json, the config, the card, then the manifest."""
    from mergesmith import __version__
    from mergesmith.io.card import model_card
    from mergesmith.io.manifest import describe_input, write_manifest
    from mergesmith.io.outdir import write_json

    copied = _write_side_files(plan, tmp, options.copy_tokenizer)
    write_json(tmp / "config.json", plan.out_config)
    # The config under mergekit's file name, which hub tooling already looks for.
    (tmp / "mergekit_config.yml").write_text(cfg.to_yaml() + "\n", encoding="utf-8")
    if options.write_model_card:
        (tmp / "README.md").write_text(model_card(cfg, cfg.to_yaml(), __version__), encoding="utf-8")
    inputs = [describe_input(str(m.ref), m.path, m.lora) for m in plan.models]
    write_manifest(tmp, inputs, hashes, __version__, seed)  # last: it hashes every other file
    return copied
