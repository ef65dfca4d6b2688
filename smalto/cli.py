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


@app.command()
def data(
    inputs: list[str] = typer.Argument(None, help="Inputs, each PATH or NAME=PATH: file, folder, glob, HF datasets folder, or - for stdin."),
    source: list[str] = typer.Option([], "--source", "-s", help="Another input as NAME=PATH (repeatable)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (train/ and val/ MDS splits + smalto_data.json)."),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Tokenizer folder or tokenizer.json."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per sample."),
    no_wrap: bool = typer.Option(False, "--no-wrap", help="One document per sample (truncated to --seq-len) instead of concatenating."),
    bos: bool = typer.Option(False, "--bos", help="Put the tokenizer's BOS token before every document."),
    eos_token: str = typer.Option(None, "--eos-token", help="EOS token text, when the tokenizer declares none."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in JSONL/JSON/Parquet/CSV/HF inputs."),
    fmt: str = typer.Option("auto", "--format", help="auto (by file suffix; stdin reads lines) | text | lines | jsonl | json | parquet | csv."),
    shard_size: int = typer.Option(1 << 26, "--shard-size", help="Maximum bytes per shard."),
    compression: str = typer.Option(None, "--compression", help="zstd or zstd:LEVEL (needs the zstandard package)."),
    dtype: str = typer.Option("int32", "--dtype", help="int32 (as llm-foundry writes) or uint16 (half the disk, vocab ≤ 65536)."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="Fraction of documents for val/, chosen by a stable hash of the text."),
    workers: int = typer.Option(1, "--workers", "-j", help="Tokenizer processes."),
    on_error: str = typer.Option("raise", "--on-error", help="raise: stop at the first bad record; skip: count and go on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Tokenize raw text into MDS token shards that `smalto train` (and llm-foundry) can stream."""
    from rich.console import Console

    from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards

    cfg = TokenizeConfig(
        sources=[*(inputs or []), *source],
        out=out,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        seq_len=seq_len,
        wrap=not no_wrap,
        bos=bos,
        eos_token=eos_token,
        text_field=text_field,
        format=fmt,
        shard_size=shard_size,
        compression=compression,
        dtype=dtype,
        val_fraction=val_fraction,
        workers=workers,
        on_error=on_error,
        overwrite=overwrite,
        progress=progress,
    )
    meta = tokenize_to_shards(cfg)
    console = Console(stderr=True)
    for s in meta["sources"]:
        for split, st in s["splits"].items():
            console.print(
                f"{s['name']}/{split}: {st['documents']:,} documents → {st['samples']:,} samples, "
                f"{st['tokens']:,} tokens in {st['shards']} shards"
            )
    if meta["skipped_records"]:
        console.print(f"[yellow]skipped {meta['skipped_records']} bad records[/], e.g. {meta['skipped_examples'][0]}")
    console.print(f"wrote {out} in {meta['seconds']:.1f}s")


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
