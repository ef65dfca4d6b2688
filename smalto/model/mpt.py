"""`MPTForCausalLM`: embedding → blocks → final norm → tied unembedding, and the loss.

Parameter names are those of the HF MPT checkpoints (`transformer.wte`, `transformer.blocks.{i}.attn.Wqkv`, ...),
so a `mosaicml/mpt-7b` state dict maps by name. The model is single-device code: parallelism, checkpoint formats
and training live elsewhere and act on it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import UserError
from smalto.model import cudnn_attention, decode_linear
from smalto.model.attention import AttentionMask, build_attention_inputs, resolve_attn_impl
from smalto.model.cache import KVCache
from smalto.model.config import MPTConfig
from smalto.model.init import init_weights
from smalto.model.layers import MPTBlock, build_norm


@dataclass
class CausalLMOutput:
    """What a forward returns, with the attribute names a transformers user expects."""

    logits: Tensor | None = None
    loss: Tensor | None = None
    past_key_values: KVCache | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
    )


_compiled_cross_entropy = None


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of next-token cross-entropies / number of non-ignored targets; labels are aligned with the inputs.

    The labels are shifted (not the logits: slicing them would copy the largest tensor of the step), and on CUDA
    the float32 upcast is fused into the loss kernel by torch.compile instead of materialising fp32 logits.
    """
    global _compiled_cross_entropy
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    fn = _cross_entropy
    if logits.is_cuda and not torch.compiler.is_compiling():
        if _compiled_cross_entropy is None:
            _compiled_cross_entropy = torch.compile(_cross_entropy, dynamic=False)
        fn = _compiled_cross_entropy
    return fn(logits, targets, ignore_index)


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
        self.train_attn_impl: str | None = None  # the kernel the last training forward took (run summaries)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        sequence_id: Tensor | None = None,
        cache: KVCache | None = None,
        cache_position: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) → hidden states (B, T, d_model)."""
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
        use_seq = c.attn_config.attn_uses_sequence_id and sequence_id is not None
        if use_seq and cache is not None:
            raise UserError(
                "sequence_id masking is for training on packed documents, not for cached decoding"
            )
        mask = AttentionMask(
            q_pos=q_pos,
            n_keys=n_keys,
            key_valid=key_valid,
            window=c.attn_config.sliding_window_size,
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
        impl = resolve_attn_impl(
            c.attn_config.attn_impl,
            device=device,
            training=self.training,
            dropout=c.attn_config.attn_pdrop > 0 and self.training,
            decode=cache is not None and T == 1,
            head_dim=c.head_dim,
            n_keys=n_keys,
            programs=input_ids.shape[0] * c.n_heads,
            cudnn_unsupported=lambda: cudnn_attention.why_not(
                c,
                device=device,
                dtype=dtype,
                batch=input_ids.shape[0],
                seq=T,
                causal_from_zero=mask.causal_only and mask.from_zero,  # from_zero: no cache, keys = queries
            ),
        )
        if self.training:
            self.train_attn_impl = impl
        inputs = build_attention_inputs(c, mask, impl=impl, dtype=dtype)
        for block in self.blocks:
            x = block(x, inputs, cache)
        return self.norm_f(x)


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
        if torch.device(target).type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise all parameters; after `to_empty()` this materialises a model built on meta."""
        init_weights(self, self.config)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def unembed(self, h: Tensor) -> Tensor:
        w = self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = decode_linear.linear(h, w)  # F.linear, or the decode kernel for a few rows on CUDA
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
    ) -> CausalLMOutput:
        cache = past_key_values
        T = input_ids.shape[1]
        if use_cache and cache is None:
            cache = KVCache.for_model(
                self.config, input_ids.shape[0], self.config.max_seq_len, self.dtype, self.device
            )
        if cache is not None:
            cache.check_room(T)
        h = self.transformer(input_ids, attention_mask, sequence_id, cache, cache_position)
        if cache is not None:
            cache.length += T
        logits = self.unembed(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits if return_logits else None, loss=loss, past_key_values=cache)

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ---- Hugging Face folders (smalto.hf holds the formats) ----
    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> MPTForCausalLM:
        from smalto.hf import load_pretrained

        return load_pretrained(path, **kwargs)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        from smalto.hf import save_pretrained

        save_pretrained(self, path, **kwargs)


def build_model(config: MPTConfig, device: torch.device | str | None = None) -> MPTForCausalLM:
    """Build and initialise; on `meta`, materialise with `to_empty` + `init_weights` where the weights should live."""
    return MPTForCausalLM(config, device=device)
