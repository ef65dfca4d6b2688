"""The `smalto` command. Each subcommand parses its arguments, calls one library function and prints.

Heavy imports (torch, transformers) stay inside the commands so `smalto --help` is instant.
A `UserError` raised anywhere below ends the program with its message and exit status 2, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from smalto import __version__
from smalto.errors import UserError

app = typer.Typer(
    name="smalto",
    help="Pretrain, finetune, evaluate, convert and serve MPT-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"smalto {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Pretrain, finetune, evaluate, convert and serve MPT-family language models."""


# ---- commands are added below, one function each; keep them thin (parse, call, print) ----


def main() -> None:
    try:
        app()
    except UserError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
