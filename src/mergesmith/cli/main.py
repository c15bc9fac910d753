"""`mergesmith` entry point: subcommands, logging tiers, and errors as one paragraph with exit code 2."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import traceback

import click

EPILOG = """\b
Examples:
  mergesmith yaml my-config.yml ./merged
  mergesmith yaml my-config.yml ./merged --dry-run
  mergesmith yaml my-config.yml ./merged --cuda --random-seed 42 --out-shard-size 2B
  mergesmith methods ties
"""


def setup_logging(verbosity: int, quiet: bool) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    if quiet and verbosity == 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mergesmith").setLevel(level)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so the temporary output is cleaned up (exit code 143)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def run_cli(fn, verbosity: int) -> None:  # type: ignore[no-untyped-def]
    """Call fn, turning known errors into a message and exit code 2 (traceback only with -vv)."""
    from mergesmith.errors import MergesmithError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        fn()
    except MergesmithError as exc:
        if verbosity > 1:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        click.echo("interrupted: nothing was written to the output path", err=True)
        # Leave at once: the output is already cleaned up, and a normal interpreter shutdown while torch's
        # worker threads are mid-operation can abort the process instead of exiting with 130.
        sys.stderr.flush()
        os._exit(143 if isinstance(exc, Terminated) else 130)
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as shell tools do
        os._exit(141)
    except MemoryError:
        click.echo("error: out of memory; try --read-ahead 1 or a machine with more RAM", err=True)
        sys.exit(2)
    except Exception as exc:
        if verbosity > 1:
            raise
        click.echo(
            f"internal error: {type(exc).__name__}: {exc}\n(this is a bug in mergesmith; run with -vv for the "
            "traceback and report it)",
            err=True,
        )
        sys.exit(1)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergesmith", prog_name="mergesmith")
def cli() -> None:
    """Merge pretrained language models in weight space (mergekit-compatible configs)."""


def _register() -> None:
    from mergesmith.cli.methods import methods_cmd
    from mergesmith.cli.yaml import yaml_cmd

    cli.add_command(yaml_cmd)
    cli.add_command(methods_cmd)


_register()


def main() -> None:
    # A short-lived process: no cyclic collections while torch's modules load (hundreds of thousands of
    # objects, each full pass walking them all); the executor turns collection back on over a frozen heap.
    gc.disable()
    # OpenMP workers (torch, numba) otherwise spin for a while after each parallel region, taking the
    # cores the reader, writer and hashing threads need; sleeping at once costs the merge nothing measurable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cli(prog_name="mergesmith")
    except SystemExit as exc:
        _leave(exc.code)
    _leave(0)


def _leave(code: object) -> None:
    """Exit with `code` (as SystemExit would read it) without tearing the interpreter down. The command is
    finished and its files are closed; unloading torch's and numba's modules object by object would take
    most of a second more."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can be shown
            pass
    os._exit(code or 0)
