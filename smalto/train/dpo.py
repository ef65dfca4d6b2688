"""The DPO objective beside the training loop (recipes are read and run by smalto/dpo.py).

Each step puts a micro-batch's chosen and rejected sequences through the policy in one concatenated forward,
sums each completion's token log-probabilities, takes the reference's under no_grad (or the cached ones), and
applies TRL's loss to the pairs:
    sigmoid  -logσ(β·d)·(1-ε) - logσ(-β·d)·ε, d = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)), ε =
             label_smoothing (cDPO, the conservative form: TRL ≤ 0.x's `sigmoid`; ε = 0 is DPO)
    ipo      (d' - 1/(2β))², d' as d with each log-ratio divided by its completion's token count (TRL's IPO)
The loss is the mean over the step's global pairs. Logged, with TRL's names and definitions: rewards/chosen and
rewards/rejected (β·(log π - log π_ref), summed log-probs), rewards/accuracies (chosen reward > rejected),
rewards/margins, logps/chosen, logps/rejected (the policy's summed log-probs), logits/chosen, logits/rejected
(mean logit over completion tokens), and TRL's `loss` as train/loss; the same under eval/ for held-out pairs.

The reference is an object with `logps(ids, labels)`: a frozen copy of the base model (`FrozenReference`), or the
policy itself with its LoRA adapters disabled (`AdaptersOff`: no second copy of the weights).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from smalto.errors import ConfigError, UserError, check_choice

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


@dataclass(kw_only=True)
class DPOSection:
    beta: float = 0.1
    """How far the policy may move from the reference (higher: less); IPO's τ."""
    loss_type: str = "sigmoid"
    """`sigmoid` (DPO; cDPO with label_smoothing) or `ipo`."""
    label_smoothing: float = 0.0
    """cDPO's ε: the probability that a preference label is flipped, in [0, 0.5); sigmoid only."""
    precompute_ref_log_probs: bool = False
    """Compute the reference's log-probabilities of every pair once before training and free the reference."""

    def __post_init__(self) -> None:
        check_choice("dpo.loss_type", self.loss_type, ("sigmoid", "ipo"))
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta = {self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing = {self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("dpo.label_smoothing applies to loss_type sigmoid only; set it to 0 for ipo")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed completion log-probs (module docstring);
    ipo needs the completions' token counts."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        d = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    elif loss_type == "ipo":
        assert chosen_lengths is not None and rejected_lengths is not None
        d = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's target tokens, their count, the sum of their mean logits): the model's
    float32 log-softmax at every target (labels ≠ -100, each predicted from the tokens before it)."""
    logits = model(ids, return_logits=True).logits[:, :-1].float()  # one float32 copy, as TRL's log-softmax
    targets = labels[:, 1:]
    mask = targets != -100
    per_token = -F.cross_entropy(
        logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
    )  # (B, T-1)
    mean_logits = (logits.detach().mean(-1) * mask).sum(-1)
    return (per_token * mask).sum(-1), mask.sum(-1), mean_logits


# ---- the reference ----


class FrozenReference:
    """A frozen copy of the base model, sharded like the policy under FSDP2."""

    def __init__(self, t: Any, weights: str | None = "base_model") -> None:
        """`weights`: the base model's (default), or None for the seed's random ones (benchmarks)."""
        from smalto.kernels import select
        from smalto.train.checkpoint import load_weights
        from smalto.train.parallel import build_model

        cfg, dev = t.cfg, t.world.device
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and dev.type == "cuda")
        dtype = torch.bfloat16 if bf16 else torch.float32
        scoring = select(cfg.model, "score", device=dev, dtype=dtype, batch=2 * t.micro, seq=cfg.data.seq_len)
        self.model = build_model(cfg.model, t.world, seed=cfg.seed, plans={"score": scoring}, bf16=bf16)
        if weights is not None:
            load_weights(cfg.base_model if weights == "base_model" else weights, self.model, t.world)
        if bf16 and t.world.world_size == 1:  # frozen: no float32 master weights needed, half the memory
            self.model.to(torch.bfloat16)
        self.model.requires_grad_(False)
        self.model.eval()
        self.autocast = t.autocast

    @torch.no_grad()
    def logps(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return sequence_logps(self.model, ids, labels)[0]


class AdaptersOff:
    """The policy with its LoRA adapters disabled: the base weights, no second copy."""

    def __init__(self, t: Any) -> None:
        try:
            from smalto.adapters.lora import adapters_disabled  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise UserError(
                "a lora section is set but this smalto has no smalto.adapters.lora.adapters_disabled; DPO with LoRA "
                "needs it"
            ) from None
        self.disable: Callable[[Any], contextlib.AbstractContextManager[Any]] = adapters_disabled
        self.t = t

    @torch.no_grad()
    def logps(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.disable(self.t.model), self.t.autocast:
            return sequence_logps(self.t.model, ids, labels)[0]


def make_reference(t: Any) -> FrozenReference | AdaptersOff:
    """LoRA's base when the recipe has a lora section, else a frozen copy of the base model."""
    return AdaptersOff(t) if getattr(t.cfg, "lora", None) is not None else FrozenReference(t)


# ---- the objective the loop runs ----


def _rows(mb: dict[str, torch.Tensor], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, labels) of the chosen then the rejected rows, cut to the longest sequence (padding is on the right,
    where causal attention never looks back at it), and the number of real tokens."""
    ids = torch.cat([mb["chosen_ids"], mb["rejected_ids"]])
    labels = torch.cat([mb["chosen_labels"], mb["rejected_labels"]])
    real = labels != -100
    last = real.float().cumsum(-1).argmax(-1)  # the last completion token of each row
    width = min(ids.shape[1], int(last.max()) + 1)
    width = min(ids.shape[1], -(-width // 16) * 16)  # fewer distinct shapes for the kernels
    n_real = int((last + 1).sum())
    return ids[:, :width].to(dev), labels[:, :width].to(dev), n_real


class DPO:
    """The `Objective` of smalto.train.loop.train for DPO (module docstring)."""

    def __init__(self, section: DPOSection) -> None:
        self.s = section
        self.reference: FrozenReference | AdaptersOff | None = None

    def loaders(self, cfg: Any, world: Any) -> tuple[Any, Any]:
        from smalto.data.preference_stream import build_preference_loaders
        from smalto.tokenizer import load_tokenizer

        tc = cfg.train
        micro = tc.micro_batch_size or tc.global_batch_size // world.world_size
        if micro < 1 or tc.global_batch_size % (world.world_size * micro):
            raise ConfigError(
                f"train.global_batch_size ({tc.global_batch_size}) must be a multiple of world size × "
                f"micro_batch_size ({world.world_size} × {micro})"
            )
        tok = load_tokenizer(cfg.tokenizer)
        if len(tok) > cfg.model.vocab_size:
            raise ConfigError(
                f"tokenizer {cfg.tokenizer} has {len(tok)} tokens, more than the model's vocab_size "
                f"{cfg.model.vocab_size}; use the base model's tokenizer"
            )
        loader, held = build_preference_loaders(
            cfg.data, tok, rank=world.rank, world_size=world.world_size, micro_batch_size=micro,
            global_batch_size=tc.global_batch_size,
        )  # fmt: skip
        from smalto.config import parse_duration

        amount, unit = parse_duration(tc.max_duration, "train.max_duration")
        if unit == "ep":
            tc.max_duration = f"{max(1, round(amount * loader.dataset.steps_per_epoch))}ba"
        return loader, held

    def start(self, t: Any) -> None:
        self.reference = make_reference(t)
        if self.s.precompute_ref_log_probs:
            for loader in (t.loader, t.val_loader):
                if loader is not None:
                    for part in loader.dataset.datasets:
                        part.data.ref_logps = self._precompute(t, part.data)
            self.reference = None  # every pair's reference log-probs are cached; the copy's memory is freed

    def _precompute(self, t: Any, data: Any) -> torch.Tensor:
        """(N, 2) reference log-probs of every pair: each rank computes every world_size-th micro-batch and the
        ranks sum their parts (all ranks run the same number of forwards, as FSDP2's collectives need)."""
        assert self.reference is not None
        dev, ws, rank, micro = t.world.device, t.world.world_size, t.world.rank, t.micro
        out = torch.zeros(len(data), 2, dtype=torch.float64, device=dev)
        starts = range(0, len(data), micro)
        for k in range(math.ceil(len(starts) / ws)):
            j = k * ws + rank
            mine = j < len(starts)
            idx = list(range(starts[j], min(starts[j] + micro, len(data)))) if mine else [0]
            mb = {key: torch.stack([data[i][key] for i in idx]) for key in data[0] if key != "index"}
            ids, labels, _ = _rows(mb, dev)
            logps = self.reference.logps(ids, labels).double()
            if mine:
                out[idx] = torch.stack(logps.chunk(2), dim=1)
        if ws > 1:
            dist.all_reduce(out)
        return out.float().cpu()

    def _pairs(self, t: Any, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(per-pair losses, per-pair metric rows (PAIR_METRICS), real tokens) of one micro-batch."""
        ids, labels, n_real = _rows(mb, t.world.device)
        with t.autocast:
            logps, counts, mean_logits = sequence_logps(t.model, ids, labels)
        if "ref_chosen_logps" in mb:
            ref = torch.cat([mb["ref_chosen_logps"], mb["ref_rejected_logps"]]).to(logps.device)
        else:
            assert self.reference is not None
            ref = self.reference.logps(ids, labels)
        (c, r), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        losses, chosen_rw, rejected_rw = dpo_loss(
            c, r, rc, rr, beta=self.s.beta, loss_type=self.s.loss_type, label_smoothing=self.s.label_smoothing,
            chosen_lengths=nc, rejected_lengths=nr,
        )  # fmt: skip
        ml_c, ml_r = mean_logits.chunk(2)
        rows = torch.stack(
            [chosen_rw, rejected_rw, (chosen_rw > rejected_rw).float(), chosen_rw - rejected_rw,
             c.detach(), r.detach(), ml_c, ml_r, nc.float(), nr.float()],
            dim=1,
        )  # fmt: skip
        return losses, rows, n_real

    def step(self, t: Any, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], str]:
        from smalto.train.loop import out_of_memory_advice, update

        start = time.perf_counter()
        dev, ws = t.world.device, t.world.world_size
        n_pairs = len(micro_batches) * t.micro * ws  # every pair counts once in the mean
        loss_sum = torch.zeros((), device=dev)
        sums = torch.zeros(len(PAIR_METRICS) + 2, device=dev)
        real = 0
        try:
            with t.weight_cast or contextlib.nullcontext():
                for i, mb in enumerate(micro_batches):
                    if ws > 1 and t.cfg.train.grad_sync == "step":
                        t.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                    losses, rows, n_real = self._pairs(t, mb)
                    loss = losses.sum() / n_pairs
                    (loss * ws).backward()  # FSDP averages gradients over ranks; we want their sum
                    loss_sum += loss.detach()
                    sums += rows.sum(0)
                    real += n_real
        except torch.OutOfMemoryError:
            raise UserError(out_of_memory_advice(t.cfg, t.micro)) from None
        if ws > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(sums)
        metrics, verdict = update(t, loss_sum, start, real_tokens=real * ws, extra=sums)
        t.tokens += t.tokens_per_step  # a pair is two rows of max_length: `update` counted one
        metrics["train/tokens"] = t.tokens
        for key in ("throughput/tokens_per_s", "throughput/mfu"):
            if metrics.get(key) is not None:
                metrics[key] *= 2
        metrics.update(_named(metrics.pop("extra"), n_pairs, ""))
        return metrics, verdict

    @torch.no_grad()
    def evaluate(self, t: Any) -> dict[str, float]:
        """The held-out pairs' mean loss (eval/loss) and TRL's pair metrics under eval/."""
        t.model.eval()
        dev = t.world.device
        sums = torch.zeros(len(PAIR_METRICS) + 4, device=dev, dtype=torch.float64)
        t.val_loader.consumed = 0  # the same pairs every time
        for i, mb in enumerate(t.val_loader):
            if i >= t.cfg.train.eval_batches:
                break
            losses, rows, _ = self._pairs(t, mb)
            sums += torch.cat(
                [losses.sum()[None], rows.sum(0), torch.tensor([len(losses)], device=dev)]
            ).double()
        if t.world.world_size > 1:
            dist.all_reduce(sums)
        t.model.train()
        values = sums.tolist()
        n = max(values[-1], 1.0)
        out = {"eval/loss": values[0] / n, **_named(values[1:-1], n, "eval/")}
        t.last_eval = out["eval/loss"]
        return out


def _named(sums: list[float], n_pairs: float, prefix: str) -> dict[str, float]:
    """TRL's pair metrics from their sums over the pairs (logits: per completion token)."""
    out = {prefix + k: v / n_pairs for k, v in zip(PAIR_METRICS[:6], sums[:6], strict=True)}
    tokens_c, tokens_r = sums[8], sums[9]
    out[prefix + "logits/chosen"] = sums[6] / max(tokens_c, 1.0)
    out[prefix + "logits/rejected"] = sums[7] / max(tokens_r, 1.0)
    return out
