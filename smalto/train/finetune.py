"""The finetuning objective beside the training loop (recipes are read and run by smalto/finetune.py).

The loss is the pretraining loss over target tokens only (labels are -100 elsewhere), so `train_step` is shared
as it is. What finetuning adds is here: the data streams, a held-out loss before the first step, greedy samples
from held-out prompts at every evaluation, and an export that chats (chat_template, generation_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalto.config import RunConfig
from smalto.errors import ConfigError, check_choice
from smalto.train.durable import replace_durably


@dataclass(kw_only=True)
class FinetuneSection:
    template: str = "auto"
    """Chat template written into the export's tokenizer_config.json: `instruct` (the MPT-7B-Instruct prompt),
    `chatml`, `vicuna` (Vicuna v1.1), `tokenizer` (keep the tokenizer's own), `none`, or `auto` (vicuna when a
    source is preprocessed with `vicuna`, chatml when one is with `chat`, else instruct). A tokenizer without a chat
    template of its own renders the training chats in this one too."""
    samples: int = 3
    """Held-out prompts answered greedily at every evaluation and at the end (console, TensorBoard); 0 = none."""
    sample_tokens: int = 64
    icl_tasks: list[str] = field(default_factory=list)
    """`smalto eval --tasks` specs (task labels, a task YAML, `gauntlet`) scored at evaluations (console, metrics,
    TensorBoard as `icl/<label>/<k>-shot`); empty = none."""
    icl_every: int = 0
    """Steps between ICL runs, checked at each evaluation (train.eval_interval) and always run at the first and the
    last; 0 = every evaluation."""
    icl_limit: int | None = 100
    """Items per task (the first ones), so that a run of the tasks takes seconds, not the whole benchmark."""
    icl_fewshot: list[int] | None = None
    """Replaces each task's num_fewshot list."""
    icl_data_root: str | None = None
    """llm-foundry's local_data layout (default: ../shared/icl_data, as `smalto eval`)."""

    def __post_init__(self) -> None:
        check_choice(
            "finetune.template", self.template, ("auto", "instruct", "chatml", "vicuna", "tokenizer", "none")
        )
        if self.samples < 0 or self.sample_tokens < 1:
            raise ConfigError("finetune.samples must be ≥ 0 and finetune.sample_tokens ≥ 1")
        if self.icl_every < 0 or (self.icl_limit is not None and self.icl_limit < 1):
            raise ConfigError(
                "finetune.icl_every must be ≥ 0 and finetune.icl_limit ≥ 1 (or null: every item)"
            )
        if self.icl_tasks:  # a wrong task name or data folder is named now, not after the first steps
            from smalto.eval.tasks import resolve_data_root, resolve_tasks

            resolve_tasks(self.icl_tasks)
            resolve_data_root(self.icl_data_root)


def finetune_loaders(cfg: RunConfig, world: Any) -> tuple[Any, Any]:
    """The training and held-out loaders of a finetuning recipe (called by `setup` before the trainer is built);
    a max_duration in epochs ("2ep") becomes steps here, once the packed rows are counted."""
    from smalto.config import parse_duration
    from smalto.data.finetune_stream import build_finetune_loaders

    tc = cfg.train
    micro = tc.micro_batch_size or tc.global_batch_size // world.world_size
    if micro < 1 or tc.global_batch_size % (world.world_size * micro):
        raise ConfigError(
            f"train.global_batch_size ({tc.global_batch_size}) must be a multiple of world size × micro_batch_size "
            f"({world.world_size} × {micro})"
        )
    tok = finetune_tokenizer(cfg)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer} has {len(tok)} tokens, more than the model's vocab_size "
            f"{cfg.model.vocab_size}; use the base model's tokenizer"
        )
    loader, held, _ = build_finetune_loaders(
        cfg.data,
        tok,
        rank=world.rank,
        world_size=world.world_size,
        micro_batch_size=micro,
        global_batch_size=tc.global_batch_size,
    )
    amount, unit = parse_duration(tc.max_duration, "train.max_duration")
    if unit == "ep":
        tc.max_duration = f"{max(1, round(amount * loader.dataset.steps_per_epoch))}ba"
    return loader, held


def finetune_tokenizer(cfg: RunConfig, path: str | Path | None = None) -> Any:
    """The recipe's tokenizer (or the one at `path`): for ChatML recipes with `<|im_start|>` and `<|im_end|>`
    added as special tokens when the model's vocabulary has room for them (smalto.tokenizer.add_chatml_tokens),
    so each marker is one token in the examples, the samples and the export. A tokenizer without a chat template
    gets the recipe's, so the chats are trained in the format the export declares."""
    import warnings

    from smalto.data.templates import TEMPLATES, recipe_template
    from smalto.tokenizer import add_chatml_tokens, load_tokenizer

    source = path or cfg.tokenizer
    assert source is not None  # load_finetune_config sets it
    tok = load_tokenizer(source)
    name = template_name(cfg)
    if not getattr(tok, "chat_template", None) and name in TEMPLATES:
        tok.chat_template = recipe_template(name, tok)
    if uses_chatml(cfg, tok) and not add_chatml_tokens(tok, cfg.model.vocab_size):
        warnings.warn(
            f"the model's vocab_size {cfg.model.vocab_size} has no room for <|im_start|> and <|im_end|> beside the "
            f"tokenizer's {len(tok)} tokens: ChatML markers are tokenized as text",
            stacklevel=2,
        )
    return tok


def uses_chatml(cfg: RunConfig, tok: Any) -> bool:
    """Whether the recipe's examples or export speak ChatML: its template is `chatml`, or a `chat` source is
    rendered by ChatML (the tokenizer has no template, or a template with `<|im_start|>`)."""
    from smalto.tokenizer import CHATML_START

    own = str(getattr(tok, "chat_template", None) or "")
    chat = any(s.preprocessing == "chat" for s in [*cfg.data.sources, *cfg.data.eval_sources])
    return template_name(cfg) == "chatml" or (chat and (not own or CHATML_START in own))


def held_out_prompts(datasets: list[Any], n: int, tokenizer: Any) -> list[str]:
    """The first `n` held-out examples' prompts: each example's tokens before its first target."""
    prompts: list[str] = []
    for data in datasets:
        for ids, labels in data.examples:
            targets = (labels != -100).nonzero()[0]
            if len(prompts) < n and len(targets):
                prompts.append(tokenizer.decode(ids[: targets[0]].tolist()))
    return prompts


def sampler(cfg: RunConfig) -> Any:
    """The `on_eval` hook: greedy answers to held-out prompts, printed and logged to TensorBoard (one process)."""
    import torch

    from smalto.generate import generate

    tok = finetune_tokenizer(cfg) if cfg.tokenizer else None

    def on_eval(t: Any, metrics: dict[str, Any]) -> None:
        if tok is None or cfg.finetune.samples == 0 or t.world.world_size > 1 or t.val_loader is None:
            return  # under FSDP no rank holds the whole model; the end of the run samples from the export
        held = [rows.data for rows in t.val_loader.dataset.datasets]
        prompts = held_out_prompts(held, cfg.finetune.samples, tok)
        t.model.eval()
        with (
            torch.random.fork_rng(devices=[]),
            t.autocast,
        ):  # sampling must not move the training RNG (resume)
            outs = generate(t.model, tok, prompts, max_new_tokens=cfg.finetune.sample_tokens, temperature=0.0)
        t.model.train()
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            t.logger.print(f"[dim]sample {i} at step {t.step}:[/] {_tail(p)!r} → {o.text!r}")
            if getattr(t.logger, "tb", None) is not None:
                t.logger.tb.add_text(f"samples/{i}", f"{p}{o.text}", t.step)

    return on_eval


def icl_scorer(cfg: RunConfig) -> Any:
    """The `on_eval` hook that scores `finetune.icl_tasks` with smalto eval's ICL code (every rank: items are split
    across ranks), adds the accuracies to the evaluation's metrics (metrics.jsonl, TensorBoard) and prints them."""
    import torch

    from smalto.eval.runner import evaluate_icl
    from smalto.eval.tasks import resolve_tasks

    ft = cfg.finetune
    if not ft.icl_tasks:
        return None
    suite = resolve_tasks(ft.icl_tasks)
    tok = finetune_tokenizer(cfg)
    last: list[int] = []  # the step of the latest run

    def on_eval(t: Any, metrics: dict[str, Any]) -> None:
        due = not last or t.step - last[-1] >= max(ft.icl_every, 1) or t.step == t.total_steps
        if not due:
            return
        last.append(t.step)
        with torch.random.fork_rng(devices=[]):  # scoring must not move the training RNG (resume)
            scores = evaluate_icl(
                t.model,
                tok,
                suite,
                data_root=ft.icl_data_root,
                fewshot=ft.icl_fewshot,
                limit=ft.icl_limit,
                batch_size=max(1, t.micro),
                max_seq_len=cfg.data.seq_len,
                on_skip=lambda key, why: t.logger.print(f"[yellow]ICL {key} skipped:[/] {why}"),
            )
        metrics.update(scores)
        shown = "  ".join(f"{k.removeprefix('icl/')} {v:.3f}" for k, v in scores.items())
        t.logger.print(f"ICL at step {t.step}: {shown}")

    return on_eval


def _tail(text: str, n: int = 60) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def template_name(cfg: RunConfig) -> str:
    name: str = cfg.finetune.template
    if name == "auto":
        steps = {s.preprocessing for s in [*cfg.data.sources, *cfg.data.eval_sources]}
        name = "vicuna" if "vicuna" in steps else "chatml" if "chat" in steps else "instruct"
    return name


def write_chat_files(cfg: RunConfig, folder: Path) -> None:
    """The export's tokenizer (with the ChatML tokens of a ChatML recipe), chat_template (tokenizer_config.json)
    and generation_config.json's EOS and end-of-turn ids."""
    from smalto.data.templates import TEMPLATES, recipe_template
    from smalto.tokenizer import CHATML_END, load_tokenizer

    name = template_name(cfg)
    with_markers = finetune_tokenizer(cfg, folder)
    if with_markers.get_vocab() != load_tokenizer(folder).get_vocab():
        _save_tokenizer(with_markers, folder)
    tc_file = folder / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    if name in TEMPLATES:
        tc["chat_template"] = recipe_template(name, with_markers)
        (folder / "chat_template.jinja").unlink(
            missing_ok=True
        )  # transformers prefers this file when present
    elif name == "none":
        tc.pop("chat_template", None)
    replace_durably(tc_file, json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    tok = load_tokenizer(folder)
    eos = [tok.eos_token_id]
    end = tok.convert_tokens_to_ids(CHATML_END) if CHATML_END in tok.get_vocab() else None
    if name == "chatml" and end is not None and end not in eos:
        eos.append(end)
    gc_file = folder / "generation_config.json"
    gc = json.loads(gc_file.read_text()) if gc_file.is_file() else {}
    gc["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    replace_durably(gc_file, json.dumps(gc, indent=2) + "\n")


def _save_tokenizer(tok: Any, folder: Path) -> None:
    """`tok`'s files written over the folder's, each replaced atomically."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                replace_durably(folder / f.name, f.read_bytes())
