"""`MPTForCausalLM`: embedding → blocks → final norm → tied unembedding, and the loss.

Parameter names are those of the HF MPT checkpoints (`transformer.wte`, `transformer.blocks.{i}.attn.Wqkv`, ...),
so a `mosaicml/mpt-7b` state dict maps by name; every linear layer is a plain `nn.Linear`. The model is
single-device reference code: attention kernels (smalto/kernels/), parallelism, checkpoint formats and training
live elsewhere and act on it from outside. Which attention kernel a forward runs is the `AttentionPlan` of its mode
(train / prefill / decode / score) in `MPTModel.plans`, chosen once by `smalto.kernels.apply`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import UserError
from smalto.model.attention import (
    AttentionInputs,
    AttentionMask,
    AttentionPlan,
    MPTAttention,
    build_attention_inputs,
    reference_plan,
)
from smalto.model.cache import KVCache
from smalto.model.config import MPTConfig
from smalto.model.init import init_weights
from smalto.model.layers import build_ffn, build_norm

MODES = (
    "train",
    "prefill",
    "decode",
    "score",
)  # what a forward is for; each mode can have its own attention plan


@dataclass
class CausalLMOutput:
    """What a forward returns, with the attribute names a transformers user expects."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    past_key_values: KVCache | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of next-token cross-entropies / number of non-ignored targets; labels are aligned with the inputs.

    The labels are shifted, not the logits (slicing them would copy the largest tensor of the step)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 → float32; float64 stays
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(wide), targets.reshape(-1), ignore_index=ignore_index
    )


def head_loss(h: Tensor, weight: Tensor, labels: Tensor, scale: float | None = None) -> Tensor:
    """The loss from the final hidden states: the logits `scale · h @ weightᵀ` in full, then `causal_lm_loss`.

    `MPTForCausalLM.head_loss` holds this function; `smalto.kernels.chunked_loss` computes the same value without the
    full logits, and training sets it from outside."""
    logits = F.linear(h, weight)
    return causal_lm_loss(logits * scale if scale is not None else logits, labels)


HeadLoss = Callable[[Tensor, Tensor, Tensor, float | None], Tensor]


def forward_mode(training: bool, cache: KVCache | None, n_tokens: int) -> str:
    """train (a forward autograd will go back through), decode (one token per row on a cache), prefill (a prompt
    into a cache) or score (a full forward without a cache, as evaluation runs)."""
    if training and torch.is_grad_enabled():
        return "train"
    if cache is not None:
        return "decode" if n_tokens == 1 else "prefill"
    return "score"


class MPTBlock(nn.Module):
    """Pre-norm block: x + attn(norm_1(x)), then x + ffn(norm_2(x))."""

    def __init__(self, config: MPTConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm_1 = build_norm(config, config.d_model, device)
        self.attn = MPTAttention(config, device)
        self.norm_2 = build_norm(config, config.d_model, device)
        self.ffn = build_ffn(config, device)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        x = x + self.resid_attn_dropout(self.attn(self.norm_1(x), inputs, cache, self.layer_idx))
        return x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))


class MPTModel(nn.Module):
    def __init__(self, config: MPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model, device=device)
        if config.uses_wpe:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model, device=device)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(config, i, device) for i in range(config.n_layers))
        self.norm_f = build_norm(config, config.d_model, device)
        # the attention plan of each mode, applied from outside (smalto.kernels.apply); a plain attribute, not
        # state: a mode without one runs `reference_plan(config)`
        self.plans: dict[str, AttentionPlan] = {}

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        sequence_id: Tensor | None = None,
        cache: KVCache | None = None,
        cache_position: Tensor | None = None,
        attention: AttentionPlan | None = None,
    ) -> Tensor:
        """input_ids (B, T) → hidden states (B, T, d_model). `attention` overrides the mode's plan."""
        x, inputs = self.embed(input_ids, attention_mask, sequence_id, cache, cache_position, attention)
        for block in self.blocks:
            x = block(x, inputs, cache)
        return self.norm_f(x)

    def plan_for(self, mode: str) -> AttentionPlan:
        plan = self.plans.get(mode)
        if plan is not None:
            return plan
        if self.config.attn_config.attn_impl in ("flex", "cudnn"):
            warnings.warn(
                f"attn_impl {self.config.attn_config.attn_impl!r} is a kernel applied from outside "
                "(smalto.kernels.apply(model)); this model has none applied and runs sdpa",
                stacklevel=3,
            )
        return reference_plan(self.config)

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        sequence_id: Tensor | None = None,
        cache: KVCache | None = None,
        cache_position: Tensor | None = None,
        attention: AttentionPlan | None = None,
    ) -> tuple[Tensor, AttentionInputs]:
        """The blocks' input (B, T, d_model) and the attention inputs all blocks share (mask, positions, kernel)."""
        c = self.config
        T = input_ids.shape[1]
        device = input_ids.device
        start = cache.length if cache is not None else 0
        q_pos = (
            cache_position if cache_position is not None else torch.arange(start, start + T, device=device)
        )
        n_keys = cache.max_len if cache is not None else T
        if cache is None and T > c.max_seq_len:
            raise UserError(
                f"input of {T} tokens is longer than max_seq_len ({c.max_seq_len}); raise max_seq_len"
            )

        key_valid = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if cache is not None:
                cache.valid.index_copy_(1, q_pos, attention_mask[:, -T:])
            elif not bool(attention_mask.all()):
                key_valid = attention_mask
        if cache is not None:
            key_valid = cache.valid  # static shape: unwritten slots are hidden by the causal mask
        window = c.attn_config.sliding_window_size
        use_seq = c.attn_config.attn_uses_sequence_id and sequence_id is not None
        if use_seq and cache is not None:
            raise UserError(
                "sequence_id masking is for training on packed documents, not for cached decoding"
            )
        mask = AttentionMask(
            q_pos=q_pos,
            n_keys=n_keys,
            key_valid=key_valid,
            window=window if 0 < window < n_keys else -1,  # a window as wide as the keys hides nothing
            from_zero=cache is None and cache_position is None,
            seq_q=sequence_id if use_seq else None,
            seq_k=sequence_id if use_seq else None,
        )

        x = self.wte(input_ids)
        if c.embedding_fraction < 1.0:  # scales the embedding's gradient only
            x = x * c.embedding_fraction + x.detach() * (1 - c.embedding_fraction)
        if c.uses_wpe:  # learned positions count from each row's first real token (left padding)
            if cache is not None:  # the cache knows every row's padding: no mask needed, no host sync
                if cache.length + T > c.max_seq_len:
                    raise UserError(
                        f"position {cache.length + T - 1} is past max_seq_len ({c.max_seq_len}) of the learned "
                        "position table"
                    )
                n_pad = (~cache.valid).long().cumsum(-1).index_select(1, q_pos)
            elif attention_mask is not None:
                n_pad = (~attention_mask).long().cumsum(-1)[:, -T:]
            else:
                n_pad = torch.zeros(1, T, dtype=torch.long, device=device)
            pos = (q_pos[None, :] - n_pad).clamp(min=0)
            x = x + self.wpe(pos)
        x = self.emb_drop(x)
        dtype = x.dtype
        if torch.is_autocast_enabled(device.type):
            # the residual stream in the autocast dtype, as FSDP2's bf16 param_dtype gives on several GPUs (and
            # llm-foundry's FSDP mixed precision): one GPU computes what N do, with half the activation traffic
            dtype = torch.get_autocast_dtype(device.type)
            x = x.to(dtype)
        plan = attention or self.plan_for(forward_mode(self.training, cache, T))
        return x, build_attention_inputs(c, mask, plan, dtype)


class MPTForCausalLM(nn.Module):
    """MPT with its language-model head. `forward` returns `CausalLMOutput(logits, loss, past_key_values)`."""

    def __init__(self, config: MPTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        target = (
            device if device is not None else ("cpu" if config.init_device == "mixed" else config.init_device)
        )
        # Always build on meta, then materialise where the weights live and initialise once: no double init,
        # and a CPU-built model and a meta-built one materialised later draw the very same random numbers.
        self.transformer = MPTModel(config, "meta")
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, device="meta")
        self.head_loss: HeadLoss = head_loss
        """The loss a forward with labels and `return_logits=False` computes from the final hidden states."""
        self.eos_token_ids: tuple[int, ...] = ()
        """Where generation stops unless told otherwise: the loaded folder's generation_config.json
        `eos_token_id` (transformers' `generation_config`: LLaMA-3's end of turn beside its end of text, a ChatML
        export's `<|im_end|>`); empty: the tokenizer's EOS."""
        if torch.device(target).type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise all parameters; after `to_empty()` this materialises a model built on meta."""
        init_weights(self, self.config)

    # device and dtype come from the final norm's weight, a parameter every model has as such: the embedding may
    # be replaced from outside by a module whose `weight` is computed (a quantized one, smalto/quant/linear.py)
    @property
    def device(self) -> torch.device:
        return next(self.transformer.norm_f.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.norm_f.parameters()).dtype

    @property
    def unembedding(self) -> Tensor:
        """The (vocab, d_model) output matrix: the embedding when tied, else lm_head's weight."""
        return self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def unembed(self, h: Tensor) -> Tensor:
        return self.scale_logits(F.linear(h, self.unembedding))

    def scale_logits(self, logits: Tensor) -> Tensor:
        scale = self.config.logit_scale_value
        return logits * scale if scale is not None else logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        sequence_id: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        cache_position: Tensor | None = None,
        return_logits: bool = True,
        attention: AttentionPlan | None = None,
    ) -> CausalLMOutput:
        cache = past_key_values
        T = input_ids.shape[1]
        if use_cache and cache is None:
            cache = KVCache.for_model(
                self.config, input_ids.shape[0], self.config.max_seq_len, self.dtype, self.device
            )
        if cache is not None:
            cache.check_room(T)
        h = self.transformer(input_ids, attention_mask, sequence_id, cache, cache_position, attention)
        if cache is not None:
            cache.length += T
        if labels is not None and not return_logits:
            head = self.head_loss(h, self.unembedding, labels, self.config.logit_scale_value)
            return CausalLMOutput(loss=head, past_key_values=cache)
        logits = self.unembed(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits if return_logits else None, loss=loss, past_key_values=cache)

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(config: MPTConfig, device: torch.device | str | None = None) -> MPTForCausalLM:
    """Build and initialise; on `meta`, materialise with `to_empty` + `init_weights` where the weights should live."""
    return MPTForCausalLM(config, device=device)
