"""The ``segsem`` command line: a thin Typer layer over the pipeline functions.

Each command lives in :mod:`segsem_cli.commands` (one module per command, with
``register(app)``); plugins may add commands through ``register_commands``.
Bad input raises :class:`~segsem_cli.errors.SegsemError`: printed as one line,
exit status 2. ``--verbose`` shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from . import __version__
from .errors import SegsemError

app = typer.Typer(
    name="segsem",
    help="Contours from CD-SEM images for OPC calibration: SAM2 + classical fallback, aligned to the layout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True)

COMMAND_MODULES = ("plugins", "synth", "evaluate", "extract", "finetune", "calibrate")


def _version(value: bool):
    if value:
        typer.echo(f"segsem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """segsem: SEM contour extraction for OPC model calibration.

    Example: segsem extract sites.csv --layout chip.gds --export gds --out out/
    """
    if verbose:
        os.environ["SEGSEM_VERBOSE"] = "1"


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"segsem_cli.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"segsem_cli.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(app)
    from .plugins import get_manager

    get_manager().hook.register_commands(app=app)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line on stderr (no source excerpt): ``warning: <message>``."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _click_exceptions() -> tuple[type, ...]:
    """Click's exception base class(es): recent typer releases vendor click as ``typer._click``
    (no ``click`` package installed); older ones use ``click`` itself."""
    import importlib

    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(mod).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    import warnings

    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    if not verbose:
        warnings.showwarning = _one_line_warning
    try:
        _register_commands()
        # Outside standalone mode click returns a command's typer.Exit code instead of raising it.
        rc = app(args=argv, prog_name="segsem", standalone_mode=False)
        if isinstance(rc, int) and rc:
            return rc
    except SegsemError as exc:
        if verbose or os.environ.get("SEGSEM_VERBOSE"):
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        return 130
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (outputs written so far are complete; re-run to resume)")
        return 130
    except Exception as exc:  # click usage errors and unexpected failures
        if isinstance(exc, _click_exceptions()):
            exc.show()
            return exc.exit_code
        if verbose or os.environ.get("SEGSEM_VERBOSE"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {msg} (run with --verbose for the traceback)", highlight=False, soft_wrap=True)
        return 1
    return 0


def run() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())
