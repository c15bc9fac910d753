"""`mergesmith yaml CONFIG OUT`: the main merge, with mergekit's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mergesmith.cli.options import merge_options, options_from

EPILOG = """\b
Examples:
  mergesmith yaml slerp.yml ./out                   merge, writing ./out atomically
  mergesmith yaml slerp.yml ./out --dry-run -v      show the plan, one line per tensor
  mergesmith yaml ties.yml ./out --random-seed 1 --out-shard-size 2B --overwrite
Exit codes: 0 success, 2 bad config/input/output (message printed), 1 internal error, 130 interrupted.
"""


@click.command("yaml", epilog=EPILOG)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option(
    "--method-plugin", "plugins", multiple=True, help="Python module or .py file that registers methods."
)
@merge_options
def yaml_cmd(config_file: str, out_path: str, plugins: tuple[str, ...], **kwargs: Any) -> None:
    """Merge models as described by CONFIG_FILE (a mergekit YAML config) into OUT_PATH."""
    from mergesmith.cli.main import run_cli, setup_logging

    verbosity = kwargs.get("verbosity") or 0
    setup_logging(verbosity, bool(kwargs.get("quiet")))
    options = options_from(kwargs)  # a bad flag value is a usage error (exit 2), raised here for click

    def work() -> None:
        from mergesmith._util import keep_freed_memory_in_heap
        from mergesmith.api import run_merge
        from mergesmith.methods.registry import load_plugin
        from mergesmith.plan.render import render

        keep_freed_memory_in_heap()  # this process ends with the merge

        for plugin in plugins:
            load_plugin(plugin)
        # A Path, not a str: as_config would read a str without a .yml suffix as YAML text.
        result = run_merge(Path(config_file), out_path, options)
        if options.dry_run:
            click.echo(render(result.plan, per_tensor=verbosity > 0))
        elif not options.quiet:
            click.echo(
                f"merged {len(result.plan.tensors)} tensors into {result.out_path} in {result.seconds:.2f}s"
            )

    run_cli(work, verbosity)
