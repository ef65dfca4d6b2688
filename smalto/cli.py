"""The `smalto` command. Each subcommand parses its arguments, calls one library function and prints.

Heavy imports (torch, transformers) stay inside the commands so `smalto --help` is instant.
A `UserError` raised anywhere below ends the program with its message and exit status 2, without a traceback.
Why one file of this size: one thin function per command, whose typer signature is its documented `--help`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from smalto import __version__
from smalto.errors import UserError

app = typer.Typer(
    name="smalto",
    help="Pretrain, finetune (full, LoRA, QLoRA), preference-tune (DPO, reward model, PPO), evaluate, convert, "
    "run and serve MPT- and LLaMA-family language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: a flag shows no type tag (in the boxed rich help every option shows one, `<bool>` too, so flags
    # look as if they took a value), and brackets in help texts stay text
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


# Sampling options of `generate` and `chat`, declared once; each command sets its own defaults in its signature.
MaxNewTokens = Annotated[
    int,
    typer.Option(
        "--max-new-tokens", "-n", help="Tokens to generate per completion (chat: per answer) at most."
    ),
]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopK = Annotated[
    int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0 or unset = off).")
]
TopP = Annotated[
    float | None,
    typer.Option(
        "--top-p", help="Keep the smallest set of tokens whose probability reaches p (1 or unset = off)."
    ),
]
MinP = Annotated[
    float | None, typer.Option("--min-p", help="Drop tokens less likely than min_p × the top token.")
]
RepetitionPenalty = Annotated[
    float, typer.Option("--repetition-penalty", help="> 1 discourages repeating tokens.")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
# One vocabulary across commands: -t is always the tokenizer, --shard-size always reads 5GB / 500MB / 2GiB / bytes,
# and a model's --dtype is always spelled as below (what `auto` means is said per command).
DTYPES = "bf16 (bfloat16) | fp16 (float16) | fp32 (float32)"
SHARD_SIZE_HELP = "Largest file, e.g. 5GB, 500MB, 2GiB or a number of bytes."
Stop = Annotated[list[str], typer.Option("--stop", help="End a completion at this string (repeatable).")]
Quantize = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="int8 | int4: quantize the linear layers' weights as the model loads (docs/quantize.md).",
    ),
]
Adapter = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        help="A PEFT LoRA adapter folder applied on top of the model, unmerged (docs/lora.md).",
    ),
]
GroupSize = Annotated[
    int,
    typer.Option(
        "--group-size",
        help="int4: inputs per scale, 32 | 64 | 128 | 256 (dividing every layer's input size).",
    ),
]

QuantizeHead = Annotated[
    bool,
    typer.Option(
        "--quantize-head",
        help="With --quantize: the tied embedding / unembedding (or lm_head) too, in the same format.",
    ),
]


def _quant_spec(quantize: str | None, group_size: int, head: bool = False):
    """The QuantSpec of --quantize / --group-size / --quantize-head (None: 16-bit)."""
    if quantize is None:
        if head:
            from smalto.errors import ConfigError

            raise ConfigError("--quantize-head quantizes the head too: give it with --quantize int8|int4")
        return None
    from smalto.quant import QuantSpec

    return QuantSpec(format=quantize, group_size=group_size, head=head)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"smalto {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Pretrain, finetune (full, LoRA, QLoRA), preference-tune (DPO, reward model, PPO), evaluate, convert, run and
    serve MPT- and LLaMA-family language models."""


# ---- commands are added below, one function each; keep them thin (parse, call, print) ----


@app.command()
def data(
    inputs: list[str] = typer.Argument(
        None, help="Inputs, each PATH or NAME=PATH: file, folder, glob, HF datasets folder, or - for stdin."
    ),
    source: list[str] = typer.Option([], "--source", "-s", help="Another input as NAME=PATH (repeatable)."),
    out: str = typer.Option(
        ..., "--out", "-o", help="Output folder (train/ and val/ MDS splits + smalto_data.json)."
    ),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Tokenizer folder or tokenizer.json."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per sample."),
    no_wrap: bool = typer.Option(
        False, "--no-wrap", help="One document per sample (truncated to --seq-len) instead of concatenating."
    ),
    bos: bool = typer.Option(False, "--bos", help="Put the tokenizer's BOS token before every document."),
    eos_token: str = typer.Option(
        None,
        "--eos-token",
        help="EOS token text (must be in the vocabulary), when the tokenizer declares none.",
    ),
    text_field: str = typer.Option(
        "text", "--text-field", help="Field holding the text in JSONL/JSON/Parquet/CSV/HF inputs."
    ),
    fmt: str = typer.Option(
        "auto",
        "--format",
        help="auto (by file suffix; stdin reads lines) | text | lines | jsonl | json | parquet | csv.",
    ),
    shard_size: str = typer.Option("64MiB", "--shard-size", help=SHARD_SIZE_HELP),
    compression: str = typer.Option(
        None, "--compression", help="zstd or zstd:LEVEL (needs the zstandard package)."
    ),
    dtype: str = typer.Option(
        "int32", "--dtype", help="int32 (as llm-foundry writes) or uint16 (half the disk, vocab ≤ 65536)."
    ),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Fraction of documents for val/, chosen by a stable hash of the text."
    ),
    workers: int = typer.Option(1, "--workers", "-j", help="Tokenizer processes."),
    on_error: str = typer.Option(
        "raise", "--on-error", help="raise: stop at the first bad record; skip: count and go on."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Tokenize raw text into MDS token shards that `smalto train` (and llm-foundry) can stream."""
    from rich.console import Console
    from rich.markup import escape

    from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards
    from smalto.sizes import parse_size

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
        shard_size=parse_size(shard_size),
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
                f"{escape(s['name'])}/{split}: {st['documents']:,} documents → {st['samples']:,} samples, "
                f"{st['tokens']:,} tokens in {st['shards']} shards"
            )
    for note in meta["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if meta["skipped_records"]:
        console.print(
            f"[yellow]skipped {meta['skipped_records']} bad records[/], e.g. {escape(str(meta['skipped_examples'][0]))}"
        )
    console.print(f"wrote {escape(out)} in {meta['seconds']:.1f}s")


@app.command("eval")
def eval_(
    model: str = typer.Argument(
        ..., help="A smalto/HF MPT folder or any local transformers causal LM folder."
    ),
    tasks: list[str] = typer.Option(
        [],
        "--tasks",
        help="Task YAML, suite (gauntlet, all) or task label; repeatable or comma-separated.",
    ),
    fewshot: str = typer.Option(
        None, "--fewshot", help="Shot counts for every task, e.g. 0,5 (default: each task's own)."
    ),
    limit: int = typer.Option(
        None,
        "--limit",
        help="Only the first N >= 1 items of each task (N samples for --perplexity, N windows for --ppl-by-position).",
    ),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Sequences per forward."),
    max_seq_len: int = typer.Option(
        None, "--max-seq-len", help="Context budget, >= 1 (default: the model's)."
    ),
    data_root: str = typer.Option(
        None, "--data-root", help="Folder of the ICL jsonl files (default ../shared/icl_data)."
    ),
    out: str = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for results.json (+ samples/, results.png); checked before evaluating.",
    ),
    log_samples: bool = typer.Option(
        False, "--log-samples", help="Write every prompt, choice scores and prediction."
    ),
    perplexity: str = typer.Option(
        None, "--perplexity", help="Token shards (a `smalto data` folder or an MDS split) to score."
    ),
    ppl_by_position: str = typer.Option(
        None,
        "--ppl-by-position",
        help="Perplexity per position bucket over windows of --length tokens: a text file, a JSONL file of "
        "{'text': ...} lines, or token shards.",
    ),
    length: int = typer.Option(
        None,
        "--length",
        help="--ppl-by-position's window in tokens (default: twice the trained length with ALiBi/RoPE).",
    ),
    buckets: int = typer.Option(None, "--buckets", help="--ppl-by-position's position buckets (default 8)."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer folder when the model folder has none."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help=f"auto (bf16 on GPU, fp32 on CPU) | {DTYPES}.",
    ),
    quantize: Quantize = None,
    group_size: GroupSize = 128,
    quantize_head: QuantizeHead = False,
    adapter: Adapter = None,
) -> None:
    """Evaluate a model on ICL tasks (llm-foundry formats, gauntlet scoring) and/or perplexity; torchrun splits items."""
    from smalto.eval.run import EvalConfig, parse_fewshot, run

    cfg = EvalConfig(
        model=model,
        tasks=tasks,
        fewshot=parse_fewshot(fewshot),
        limit=limit,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        data_root=data_root,
        out=out,
        log_samples=log_samples,
        perplexity=perplexity,
        ppl_by_position=ppl_by_position,
        length=length,
        buckets=buckets,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        quantize=_quant_spec(quantize, group_size, quantize_head),
        adapter=adapter,
    )
    run(cfg)


@app.command(context_settings={"allow_extra_args": False})
def train(
    args: list[str] = typer.Argument(
        None,
        metavar="[RECIPE] [KEY=VALUE]...",
        help="RECIPE (a YAML path or a shipped name; default tiny) then KEY=VALUE overrides, e.g. "
        "train.max_duration=200ba 'data.sources=[{path: /data/c4}]'.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved recipe (every key, overrides applied) and exit."
    ),
) -> None:
    """Train an MPT from a recipe; under `torchrun --nproc_per_node N` it shards with FSDP2. No arguments: the stdlib demo.

    Shipped recipes: tiny (the demo), mpt-125m, mpt-350m, mpt-760m, mpt-1b, mpt-3b, mpt-7b, mpt-30b,
    mpt-7b-storywriter (MPT-7B trained on at 65,536 tokens; docs/long-context.md). Every recipe
    key, with its meaning, is in docs/train.md; `smalto train RECIPE --print-config` shows them all with their
    values. Relaunching the same command resumes from the run's latest checkpoint.

    Exit status: 0 done (or `train.stop_after` reached), 2 a mistake in the recipe or the command, 3 stopped by the
    loss guard (the message names the checkpoint to resume from), 143 / 130 stopped by SIGTERM / SIGINT after a
    checkpoint, 1 a crash."""
    from rich.console import Console
    from rich.markup import escape

    from smalto.config import load_config
    from smalto.train.loop import train as run_training

    recipe, args = _recipe_and_overrides(args)
    cfg = load_config(recipe, args)
    if print_config:
        import yaml

        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), nl=False)
        return
    result = run_training(cfg)
    console = Console(stderr=True)
    for text in result.samples:
        console.rule("sample")
        console.print(text, markup=False, highlight=False)
    if result.stopped and result.stopped.startswith("guard"):
        # exit status 3: neither done (0) nor a crash (1); a scheduler can tell it needs a person
        console.print(
            f"[bold red]stopped by the loss guard[/] after {result.steps} completed steps: {escape(result.stopped[len('guard: ') :])}\n"
            f"resume from: {escape(result.checkpoint or '(no checkpoint from before it)')} (`latest` points there; "
            "relaunch the same command)\nto skip the offending batches instead of stopping, relaunch with "
            "guard.spike=skip (loss spikes) or guard.nan=skip (NaN/inf losses); lowering optimizer.lr also helps",
            highlight=False,
            soft_wrap=True,  # the path stays whole, to copy
        )
        raise typer.Exit(3)
    if result.stopped:
        console.print(
            f"[bold yellow]stopped:[/] {escape(result.stopped)}; checkpoint: {escape(str(result.checkpoint))}",
            highlight=False,
        )
        if result.stopped != "stop_after":  # a planned time slice ends normally
            raise typer.Exit(143 if result.stopped == "SIGTERM" else 130)


def _recipe_and_overrides(args: list[str] | None) -> tuple[str | None, list[str]]:
    """A training command's arguments: an optional RECIPE first (no `=` in it), then KEY=VALUE overrides."""
    rest = list(args or [])
    return (rest.pop(0) if rest and "=" not in rest[0] else None), rest


def _exit_if_stopped(train, console) -> None:
    """Exit as `smalto train` does when a finetuning-loop run (its TrainResult) stopped early: 3 by the loss guard,
    143 / 130 by SIGTERM / SIGINT; a run that reached `train.stop_after` ends normally."""
    stopped = train.stopped
    if stopped and stopped.startswith("guard"):
        console.print(f"[bold red]stopped by the loss guard:[/] {stopped}; resume from {train.checkpoint}")
        raise typer.Exit(3)
    if stopped and stopped != "stop_after":
        console.print(f"[bold yellow]stopped:[/] {stopped}; checkpoint: {train.checkpoint}")
        raise typer.Exit(143 if stopped == "SIGTERM" else 130)


@app.command(context_settings={"allow_extra_args": False})
def finetune(
    args: list[str] = typer.Argument(
        None,
        metavar="[RECIPE] [KEY=VALUE]...",
        help="RECIPE (YAML path or shipped name: tiny-instruct, mpt-7b-instruct, mpt-7b-chat, mpt-30b-instruct, "
        "llama-7b-alpaca, vicuna-7b; default tiny-instruct) then KEY=VALUE overrides.",
    ),
) -> None:
    """Finetune a model on instructions or chats (loss on responses only) with the trainer of `smalto train`.

    The recipe's base_model is any model smalto.load reads (HF folder, run, checkpoint); the result is an HF
    folder with a chat template. A lora section (lora.r=8 on the command line makes one) trains LoRA adapters on a
    frozen base and writes PEFT's adapter folder; LoRA recipes: mpt-7b-instruct-lora, mpt-7b-chat-qlora,
    mpt-30b-instruct-qlora, llama-7b-alpaca-lora (docs/lora.md). No arguments: the stdlib instruction demo. Exit status as `smalto train` (0, 2, 3, 143 / 130)."""
    from rich.console import Console

    from smalto.finetune import finetune as run_finetune
    from smalto.finetune import show

    recipe, args = _recipe_and_overrides(args)
    result = run_finetune(recipe, args)
    console = Console(stderr=True)
    show(result, console)
    _exit_if_stopped(result.train, console)


@app.command(context_settings={"allow_extra_args": False})
def dpo(
    args: list[str] = typer.Argument(
        None,
        metavar="[RECIPE] [KEY=VALUE]...",
        help="RECIPE (YAML path or shipped name: tiny-dpo, mpt-7b-dpo; default tiny-dpo) then KEY=VALUE overrides.",
    ),
) -> None:
    """Preference-tune a model with DPO (TRL's prompt/chosen/rejected pairs) on the trainer of `smalto train`.

    The recipe's base_model is the SFT model (anything smalto.load reads): the policy starts from it and a frozen
    copy is the reference. Loss sigmoid (DPO, cDPO with dpo.label_smoothing) or ipo; the result is an HF folder.
    No arguments: the stdlib docstring demo. Exit status as `smalto train` (0, 2, 3, 143 / 130)."""
    from rich.console import Console

    from smalto.dpo import dpo as run_dpo
    from smalto.dpo import show

    recipe, args = _recipe_and_overrides(args)
    result = run_dpo(recipe, args)
    console = Console(stderr=True)
    show(result, console)
    _exit_if_stopped(result.train, console)


@app.command(context_settings={"allow_extra_args": False})
def reward(
    args: list[str] = typer.Argument(
        None,
        metavar="[RECIPE] [KEY=VALUE]...",
        help="RECIPE (YAML path or shipped name: tiny-reward, mpt-7b-reward; default tiny-reward) then KEY=VALUE "
        "overrides.",
    ),
) -> None:
    """Train a reward model (Bradley-Terry on prompt/chosen/rejected pairs) and write it as an HF folder.

    The folder loads in transformers as MptForSequenceClassification (num_labels 1) and scores as smalto does.
    No arguments: the stdlib demo (prefer function bodies that return a value); prints held-out accuracy.
    Relaunching the same command resumes from the run's latest checkpoint. Exit status: 0 done (or
    `reward.stop_after` reached), 2 a mistake in the recipe or the command, 143 / 130 stopped by SIGTERM / SIGINT
    after a checkpoint, 1 a crash."""
    from rich.console import Console

    from smalto.reward import run_reward, show

    recipe, args = _recipe_and_overrides(args)
    result = run_reward(recipe, args)
    show(result, Console(stderr=True))
    if result.stopped in ("SIGTERM", "SIGINT"):
        raise typer.Exit(143 if result.stopped == "SIGTERM" else 130)


@app.command(context_settings={"allow_extra_args": False})
def ppo(
    args: list[str] = typer.Argument(
        None,
        metavar="[RECIPE] [KEY=VALUE]...",
        help="RECIPE (YAML path or shipped name: tiny-ppo, mpt-7b-ppo; default tiny-ppo) then KEY=VALUE overrides.",
    ),
) -> None:
    """Optimise a policy with PPO against a reward model folder or a rule, with a KL penalty to the start model.

    Rollouts come from smalto's decoder (KV cache; a CUDA graph on GPU); the critic is a value head on the policy.
    No arguments: the stdlib demo (completions of function heads, rewarded by rule for an assignment); prints the
    held-out score before and after. Relaunching the same command resumes from the run's latest checkpoint. Exit
    status: 0 done (or `ppo.stop_after` reached), 2 a mistake in the recipe or the command, 143 / 130 stopped by
    SIGTERM / SIGINT after a checkpoint, 1 a crash."""
    from rich.console import Console

    from smalto.ppo import run_ppo, show

    recipe, args = _recipe_and_overrides(args)
    result = run_ppo(recipe, args)
    show(result, Console(stderr=True))
    if result.stopped in ("SIGTERM", "SIGINT"):
        raise typer.Exit(143 if result.stopped == "SIGTERM" else 130)


@app.command()
def plot(
    run: str = typer.Argument(..., help="Run folder (holding metrics.jsonl)."),
    out: str = typer.Option(None, "--out", "-o", help="PNG path; default RUN/curves.png."),
) -> None:
    """Draw the loss, learning-rate and throughput curves of a run to a PNG (needs matplotlib)."""
    from smalto.plot import plot_run

    typer.echo(plot_run(run, out))


def _read_prompts(prompt: list[str], prompts_file: str | None, prompt_file: str | None = None) -> list[str]:
    prompts = list(prompt)
    if prompt_file:  # a whole file, newlines and all, is one prompt (a book to continue)
        from pathlib import Path

        if not Path(prompt_file).is_file():
            raise UserError(f"--prompt-file {prompt_file} does not exist")
        try:
            prompts.append(Path(prompt_file).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {prompt_file} is not UTF-8 text ({e})") from None
    if prompts_file == "-":
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    elif prompts_file:
        from pathlib import Path

        if not Path(prompts_file).is_file():
            raise UserError(f"--prompts-file {prompts_file} does not exist")
        prompts += [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(
            "no prompt given: use --prompt TEXT (repeatable), --prompts-file FILE (- for stdin) or "
            "--prompt-file FILE"
        )
    return prompts


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(
        ..., help="HF model folder (config.json + weights), or a training run / checkpoint folder."
    ),
    prompt: list[str] = typer.Option(
        [], "--prompt", "-p", help="A prompt (repeatable: prompts run as one batch)."
    ),
    prompts_file: str = typer.Option(
        None, "--prompts-file", "-f", help="One prompt per line; - reads stdin."
    ),
    prompt_file: str = typer.Option(
        None, "--prompt-file", help="A whole file (UTF-8) as one prompt, e.g. a book to continue."
    ),
    tokenizer: str = typer.Option(
        None,
        "--tokenizer",
        "-t",
        help="Tokenizer folder or tokenizer.json (default: the model folder, or a run's own tokenizer).",
    ),
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = [],  # noqa: B006 (typer passes a new list)
    dtype: str = typer.Option("auto", "--dtype", help=f"auto (the checkpoint's) | {DTYPES}."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available)."),
    max_seq_len: int = typer.Option(
        None, "--max-seq-len", help="Raise the context (ALiBi/RoPE run past training length)."
    ),
    prefill_chunk: int = typer.Option(
        2048, "--prefill-chunk", help="Prompt tokens per prefill forward, at most (>= 1)."
    ),
    echo: bool = typer.Option(False, "--echo", help="Print each prompt before its completion."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON line per prompt instead of text: prompt, text, token ids and counts, finish reason, timings.",
    ),
    quantize: Quantize = None,
    group_size: GroupSize = 128,
    quantize_head: QuantizeHead = False,
    adapter: Adapter = None,
    template: str = typer.Option(
        "none",
        "--template",
        help="none (raw text) | instruct (the MPT-7B-Instruct prompt) | chat (one user turn in the tokenizer's "
        "chat template, else ChatML).",
    ),
) -> None:
    """Complete prompts, printing tokens as they come (one prompt), or each completion in turn (several).

    A --max-new-tokens that does not fit the model's context after the longest prompt is clipped to it (with a note)."""
    prompts = _read_prompts(prompt, prompts_file, prompt_file)
    import json
    import time

    from smalto.chat import template_prompt
    from smalto.errors import check_choice
    from smalto.generate import encode_prompts, fit_new_tokens, generate
    from smalto.load import load_model_and_tokenizer

    check_choice("--template", template, ("none", "instruct", "chat"))
    lm, tok = load_model_and_tokenizer(
        model,
        tokenizer,
        dtype=dtype,
        device=device,
        max_seq_len=max_seq_len,
        quantize=_quant_spec(quantize, group_size, quantize_head),
        adapter=adapter,
    )
    from smalto.tokenizer import chat_stop_strings, encode_rendered_chat

    if template != "none":
        prompts = [template_prompt(tok, p, template) for p in prompts]
        stop = [*stop, *(chat_stop_strings(tok) if template == "chat" else [])]
    # what the model reads: a chat rendering with no special token added where its template writes them
    inputs: list[str] | list[list[int]] = (
        [encode_rendered_chat(tok, p) for p in prompts] if template == "chat" else prompts
    )
    longest = max(len(ids) for ids in encode_prompts(tok, inputs))
    max_new_tokens, clipped = fit_new_tokens(lm, longest, max_new_tokens)
    if clipped:
        typer.echo(f"note: {clipped}", err=True)
    one = len(prompts) == 1 and not as_json
    first_token: dict[int, float] = {}

    def show(d) -> None:
        first_token.setdefault(d.row, time.perf_counter() - t0)
        if one:
            sys.stdout.write(d.text)
            sys.stdout.flush()

    if one and echo:
        sys.stdout.write(prompts[0])
    t0 = time.perf_counter()
    outs = generate(
        lm,
        tok,
        inputs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        callback=show,
        prefill_chunk=prefill_chunk,
    )
    dt = time.perf_counter() - t0
    if as_json:
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            row = {
                "prompt": p,
                "text": o.text,
                "token_ids": o.token_ids,
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": len(o.token_ids),
                "finish_reason": o.finish_reason,
                "seconds": round(dt, 4),  # the batch's, all prompts together
                "first_token_seconds": round(first_token.get(i, dt), 4),
            }
            typer.echo(json.dumps(row, ensure_ascii=False))
    elif one:
        sys.stdout.write("\n")
    else:
        for i, o in enumerate(outs):
            typer.echo(f"--- {i + 1} ({o.finish_reason}) ---\n{prompts[i] if echo else ''}{o.text}")
    n = sum(len(o.token_ids) for o in outs)
    typer.echo(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s]", err=True)


@app.command()
def chat(
    model: str = typer.Argument(
        ..., help="HF model folder (config.json + weights), or a training run / checkpoint folder."
    ),
    tokenizer: str = typer.Option(
        None,
        "--tokenizer",
        "-t",
        help="Tokenizer folder or tokenizer.json (default: the model folder, or a run's own tokenizer).",
    ),
    system: str = typer.Option(None, "--system", help="A system message that starts the conversation."),
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = None,
    top_p: TopP = 0.95,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    dtype: str = typer.Option("auto", "--dtype", help=f"auto (the checkpoint's) | {DTYPES}."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available)."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Raise the context (ALiBi/RoPE)."),
    quantize: Quantize = None,
    group_size: GroupSize = 128,
    quantize_head: QuantizeHead = False,
    adapter: Adapter = None,
) -> None:
    """Talk with a model, one line per turn (terminal or piped stdin). /reset clears the history, /exit ends."""
    from smalto.chat import ChatSession
    from smalto.load import load_model_and_tokenizer

    lm, tok = load_model_and_tokenizer(
        model,
        tokenizer,
        dtype=dtype,
        device=device,
        max_seq_len=max_seq_len,
        quantize=_quant_spec(quantize, group_size, quantize_head),
        adapter=adapter,
    )
    session = ChatSession(
        lm,
        tok,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        note=lambda text: typer.echo(f"note: {text}", err=True),
    )
    tty = sys.stdin.isatty()
    if tty:
        typer.echo("chat: /reset clears the history, /exit (or Ctrl-D) ends", err=True)
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            typer.echo("[history cleared]", err=True)
            continue
        session.send(text, callback=_print_delta)
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
def convert(
    src: str = typer.Argument(
        ...,
        help="A checkpoint smalto reads: an HF MPT folder, or a training run folder, its checkpoints/ or a step_* folder.",
    ),
    dst: str = typer.Argument(..., help="The HF folder to write."),
    dtype: str = typer.Option("auto", "--dtype", help=f"auto (the checkpoint's) | {DTYPES}."),
    shard_size: str = typer.Option("5GB", "--shard-size", help=SHARD_SIZE_HELP),
    bin: bool = typer.Option(False, "--bin", help="Write pytorch_model*.bin instead of safetensors."),
    quantize: str = typer.Option(
        None, "--quantize", help="int8 | int4: write a quantized folder smalto loads (docs/quantize.md)."
    ),
    group_size: GroupSize = 128,
    symmetric: bool = typer.Option(
        False, "--symmetric", help="int4: symmetric groups (no zero points) instead of scale + zero point."
    ),
    quantize_head: QuantizeHead = False,
) -> None:
    """Convert a checkpoint into a Hugging Face folder: LLaMA-architecture models as native Llama folders, MPT natively
    or with trust_remote_code (see docs/hf.md)."""
    import json
    from pathlib import Path

    from smalto.convert import convert as convert_checkpoint

    out = convert_checkpoint(
        src,
        dst,
        dtype=dtype,
        shard_size=shard_size,
        safe_serialization=not bin,
        quantize=quantize,
        group_size=group_size,
        symmetric=symmetric,
        quantize_head=quantize_head,
    )
    cfg = json.loads((Path(out) / "config.json").read_text())
    files = sorted(p.name for p in Path(out).iterdir() if p.suffix in (".safetensors", ".bin"))
    if "quantization_config" in cfg:
        from smalto.quant import QuantSpec

        spec = QuantSpec.from_config(cfg["quantization_config"], str(out))
        typer.echo(
            f"wrote {out}: {len(files)} weight file(s), {spec.describe()}; smalto loads it (not transformers)"
        )
        return
    if cfg["model_type"] in ("llama", "mistral"):
        how = f"natively ({cfg['architectures'][0]})"
    elif cfg["model_type"] == "mpt":
        how = "natively and with trust_remote_code"
    else:
        how = "with trust_remote_code=True only (" + ", ".join(cfg["smalto"]["why_not_native"]) + ")"
    typer.echo(f"wrote {out}: {len(files)} weight file(s), {cfg['torch_dtype']}; transformers loads it {how}")


@app.command()
def merge(
    base: str = typer.Argument(
        ..., help="The base model the adapter was trained on (anything smalto loads)."
    ),
    adapter: str = typer.Argument(..., help="A PEFT LoRA adapter folder (adapter_config.json + weights)."),
    out: str = typer.Argument(..., help="The HF folder to write: the base with the adapter in its weights."),
    dtype: str = typer.Option("auto", "--dtype", help=f"auto (the base's) | {DTYPES}."),
    shard_size: str = typer.Option("5GB", "--shard-size", help=SHARD_SIZE_HELP),
) -> None:
    """Merge a LoRA adapter into its base and write a plain HF folder (with the adapter's or the base's tokenizer)."""
    from smalto.adapters.merge import merge_adapter

    note = merge_adapter(base, adapter, out, dtype=dtype, shard_size=shard_size)
    typer.echo(note)


@app.command()
def serve(
    model: str = typer.Argument(
        ..., help="HF model folder (config.json + weights), or a training run / checkpoint folder."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str = typer.Option(
        None,
        "--api-key",
        help="Require 'Authorization: Bearer KEY' on /v1/* (env SMALTO_API_KEY).",
        envvar="SMALTO_API_KEY",
    ),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together (KV cache slots)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests waiting for a slot before 429."),
    max_seq_len: int = typer.Option(
        None, "--max-seq-len", help="Context per sequence (default the model's; ALiBi/RoPE run past it)."
    ),
    prefill_chunk: int = typer.Option(
        2048, "--prefill-chunk", help="Prompt tokens prefilled per engine step, over all new requests."
    ),
    tokenizer: str = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer folder or tokenizer.json (default: the model's)."
    ),
    served_model_name: str = typer.Option(
        None, "--served-model-name", help="The model id of the API (default: MODEL as given)."
    ),
    grace: float = typer.Option(
        30.0, "--grace", help="Seconds running requests get to finish after SIGTERM."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (the checkpoint's) | bf16 (bfloat16) | fp16 (float16) | fp32 (float32)."
    ),
    adapter: Adapter = None,
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available)."),
    quantize: Quantize = None,
    group_size: GroupSize = 128,
    quantize_head: QuantizeHead = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching, and a chat page at / (docs/serve.md)."""
    from smalto.serve.run import serve as run_server

    run_server(
        model,
        tokenizer=tokenizer,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_seq_len=max_seq_len,
        prefill_chunk=prefill_chunk,
        dtype=dtype,
        device=device,
        served_model_name=served_model_name,
        grace=grace,
        adapter=adapter,
        quantize=_quant_spec(quantize, group_size, quantize_head),
        on_ready=lambda url: typer.echo(f"serving {model} at {url} (chat page: {url}/)", err=True),
    )


def _print_delta(delta) -> None:
    sys.stdout.write(delta.text)
    sys.stdout.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line a user reads ("warning: ..."), without the source file and line of the code."""
    (file or sys.stderr).write(f"warning: {message}\n")


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning
    try:
        app()
    except UserError as e:
        from rich.console import Console
        from rich.markup import escape

        # escaped: a message's brackets are text ('smalto[plot]', a list of keys), not markup
        # soft_wrap: the terminal wraps the line, rich does not break it (a path in it stays whole, to copy)
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
