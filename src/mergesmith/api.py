"""run_merge: config -> plan -> execute -> output directory. The CLI and every tool go through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mergesmith.config.load import load_config, load_config_text
from mergesmith.config.schema import MergeConfig
from mergesmith.errors import MergesmithError, OutputError
from mergesmith.options import MergeOptions
from mergesmith.plan.build import PlanOptions, build_plan
from mergesmith.plan.types import MergePlan

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
    from mergesmith import __version__
    from mergesmith.engine.execute import ExecOptions, execute
    from mergesmith.io.card import model_card
    from mergesmith.io.outdir import atomic_dir, check_target, copy_side_files, write_json
    from mergesmith.io.write import OutEntry, ShardWriter, layout_shards

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
        src = Path(m.path).resolve()
        if target == src or target in src.parents:
            raise OutputError(
                f"output path {out} holds input model {m.ref}; writing there would delete it: "
                "choose another output directory"
            )
    if options.num_threads:
        import torch

        torch.set_num_threads(options.num_threads)
    entries = [OutEntry(t.name, t.out_dtype, t.shape) for t in plan.tensors]
    shards = layout_shards(entries, options.out_shard_size)
    with atomic_dir(out, options.overwrite) as tmp:
        writer = ShardWriter(tmp, shards)
        try:
            seconds = execute(
                plan,
                writer,
                ExecOptions(
                    device=options.resolved_device(),
                    read_ahead=options.read_ahead,
                    quiet=options.quiet,
                    random_seed=options.random_seed,
                ),
            )
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        donor = plan.models[plan.donor]
        copied = copy_side_files(donor.path, tmp, options.copy_tokenizer)
        write_json(tmp / "config.json", plan.out_config)
        # The config under mergekit's file name, which hub tooling already looks for.
        (tmp / "mergekit_config.yml").write_text(cfg.to_yaml() + "\n", encoding="utf-8")
        if options.write_model_card:
            (tmp / "README.md").write_text(model_card(cfg, cfg.to_yaml(), __version__), encoding="utf-8")
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    log.info("wrote %s (%d tensors, %d shards, %s)", out, len(plan.tensors), len(shards), ", ".join(copied))
    return MergeResult(out, plan, seconds, files)
