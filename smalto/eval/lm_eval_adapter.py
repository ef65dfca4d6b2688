"""EleutherAI lm-evaluation-harness adapter: `SmaltoLM`, registered as the model name `smalto`.

lm-eval is an optional extra (`pip install lm-eval`); only this module imports it. lm-eval 0.4 finds a model
name only in its own table (lm_eval/models/__init__.py) or in a module that registered it before the CLI looks it
up: it reads no entry points, `--include_path` loads task YAMLs only, and `--model` takes a registered name, not a
class path. So `lm_eval --model smalto` cannot work; run lm-eval's CLI through this module, which registers
`smalto` first and then hands over to lm-eval unchanged:

    python -m smalto.eval.lm_eval_adapter --model smalto --model_args pretrained=PATH --tasks lambada_openai
    python -m smalto.eval.lm_eval_adapter run --model smalto ...          # lm-eval ≥ 0.4.10 subcommand form

`--model_args` may hold batch_size / device (they take precedence over lm-eval's --batch_size / --device), and
HFLM's add_bos_token / prefix_token_id; lm-eval's own default device (cuda:0) becomes cpu, with a warning, on a
machine without CUDA. Texts are tokenized as HFLM tokenizes them (`tok_encode`): with the tokenizer's default
special tokens (a LLaMA tokenizer's BOS) unless add_bos_token says otherwise.

or the Python API: `lm_eval.simple_evaluate(model=SmaltoLM(pretrained=PATH), tasks=[...])`, also with an
in-memory model: `SmaltoLM(model=model, tokenizer=tokenizer)`.

The harness's text requests become the same token requests `smalto eval` scores, through the same batched
scorer (shared-prefix KV cache for MPT), so its log-likelihoods equal smalto's.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from smalto.eval import scorer
from smalto.eval.prompts import Request
from smalto.eval.scoring import Score


@register_model("smalto")
class SmaltoLM(LM):
    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = 16,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | str | None = None,
        **_ignored: Any,  # lm-eval passes its own options (max_batch_size, ...) to every model
    ) -> None:
        super().__init__()
        from smalto.eval.models import load_model, load_tokenizer

        if model is None:
            if pretrained is None:
                raise ValueError("SmaltoLM needs pretrained=PATH or model=... (with tokenizer=...)")
            model, tok = load_model(pretrained, tokenizer=tokenizer, device=device, dtype=dtype)
        else:
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.model, self.tokenizer = model.eval(), tok
        self.batch_size = 16 if batch_size == "auto" else int(batch_size)
        self.max_length = int(max_length) if max_length else scorer.model_max_len(model)
        self.max_gen_toks = int(max_gen_toks)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # HFLM's options: add_bos_token None leaves BOS to the tokenizer (LLaMA's adds it, GPT-NeoX's does not)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("true", "1")
        default_prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.prefix_id = int(prefix_token_id) if prefix_token_id is not None else default_prefix

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> SmaltoLM:
        """lm-eval's CLI path: `--model_args` merged over its own `--batch_size` / `--device` (lm-eval passes
        both, so `batch_size` in --model_args would otherwise arrive twice); an unset device means auto."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> SmaltoLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if str(extra.get("device", "")).startswith("cuda") and "device" not in arg_dict:
            import torch

            if not torch.cuda.is_available():  # lm-eval's CLI passes device cuda:0 unless told otherwise
                warnings.warn(
                    f"lm-eval asked for device {extra['device']}; this machine has no CUDA: using cpu",
                    stacklevel=2,
                )
                extra["device"] = "cpu"
        return cls(**{**extra, **arg_dict})

    # ---- tokens
    def _encode(self, text: str, special: bool | None = None) -> list[int]:
        """lm-eval's HFLM.tok_encode: special tokens as `add_bos_token` says, else as the tokenizer adds them by
        default (LLaMA's BOS), not again when the text starts with the BOS string."""
        tok = self.tokenizer
        if special is None:
            special = self.add_bos_token
        if special is None:
            bos = tok.decode([self.prefix_id]) if self.prefix_id is not None else None
            special = not (bos and text.startswith(bos))
        ids = list(tok(text, add_special_tokens=special)["input_ids"])
        if special and self.add_bos_token and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
            ids = [tok.bos_token_id, *ids]  # HFLM builds the tokenizer with add_bos_token=True
        return ids

    def _pair(self, context: str, continuation: str) -> Request:
        """lm-eval's split: trailing context spaces move to the continuation; the continuation's tokens are
        whatever the joint encoding adds after the context's (so merges across the boundary are honoured)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            ctx, cont = [self.prefix_id], self._encode(continuation)
        else:
            whole, ctx = self._encode(context + continuation), self._encode(context)
            cont = whole[len(ctx) :]
        cont = cont[-self.max_length :]
        room = self.max_length - len(cont)
        return Request(ctx[-room:] if room > 0 else ctx[-1:], cont)

    def _score(self, requests: list[Request]) -> list[Score]:
        out: dict[int, Score] = {}
        for batch in scorer.plan_batches(requests, self.batch_size):
            got = scorer.score_batch(self.model, [requests[i] for i in batch], self.pad_id, self.max_length)
            out.update(zip(batch, got, strict=True))
        return [out[i] for i in range(len(requests))]

    # ---- the harness's three request types
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        scores = self._score([self._pair(*r.args) for r in requests])
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        flat: list[Request] = []
        owner: list[int] = []
        for i, r in enumerate(requests):
            (text,) = r.args
            windows = get_rolling_token_windows(self._encode(text), self.prefix_id, self.max_length, 1)
            for ctx, pred in map(make_disjoint_window, windows):
                flat.append(Request(list(ctx), list(pred)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(flat), strict=True):
            totals[i] += s.logprob
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = []
        for r in requests:  # one at a time: each request carries its own stop strings and budget
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._encode(context)[-(self.max_length - budget) :] or [self.prefix_id]
            (text,) = scorer.generate_greedy(
                self.model, self.tokenizer, [ids], max_new_tokens=budget, stop=until, pad_id=self.pad_id
            )
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line, with `smalto` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
