import torch

from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

VOCAB = 128


def tiny(seed: int = 0, **overrides) -> MPTForCausalLM:
    """A 2-layer, d_model-64 MPT in float32 with the given config overrides."""
    base = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 64,
        "vocab_size": VOCAB,
        "no_bias": True,
        "attn_config": {"alibi": True, "attn_impl": "eager"},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}  # type: ignore[dict-item]
        else:
            base[k] = v
    torch.manual_seed(seed)
    model = MPTForCausalLM(MPTConfig.from_dict(base))
    # break the symmetry of init (norm weights 1, zero biases) so every parameter matters in comparisons
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def with_impl(model: MPTForCausalLM, impl: str) -> MPTForCausalLM:
    model.config.attn_config.attn_impl = impl
    return model
