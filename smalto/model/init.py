"""Parameter initialisation, as llm-foundry's `param_init_fns` (the schemes of `init_config.name`).

- Linear weights: the chosen scheme; fused Wqkv is initialised per Q/K/V slice (fan sizes of each slice).
- Residual output projections (`out_proj`, `down_proj`): divided by sqrt(2 * n_layers) when
  `init_div_is_residual` is true (or by the number given).
- Embeddings: normal(emb_init_std) or uniform(emb_init_uniform_lim) when set, else the scheme.
- Norms: weight 1, bias 0. Biases: 0.
The same function initialises a model built on CPU and one materialised from the meta device.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Any

import torch
from torch import nn

from smalto.model.config import MPTConfig
from smalto.model.layers import LayerNorm, RMSNorm


def _weight_init_fn(config: MPTConfig):
    c = config.init_config
    kaiming: dict[str, Any] = {"a": c.init_gain, "mode": c.fan_mode, "nonlinearity": c.init_nonlinearity}
    if c.name == "baseline_":
        return partial(nn.init.normal_, mean=0.0, std=float(c.init_std or 0.0))
    if c.name == "small_init_" or c.name == "neox_init_":
        return partial(nn.init.normal_, mean=0.0, std=math.sqrt(2 / (5 * config.d_model)))
    if c.name == "kaiming_normal_":
        return partial(nn.init.kaiming_normal_, **kaiming)
    if c.name == "kaiming_uniform_":
        return partial(nn.init.kaiming_uniform_, **kaiming)
    if c.name == "xavier_normal_":
        return partial(nn.init.xavier_normal_, gain=c.init_gain or 1.0)
    return partial(nn.init.xavier_uniform_, gain=c.init_gain or 1.0)


def _residual_div(config: MPTConfig) -> float:
    c = config.init_config
    if c.name == "neox_init_":
        return config.n_layers / math.sqrt(10)
    if c.init_div_is_residual is True:
        return math.sqrt(2 * config.n_layers)
    if c.init_div_is_residual is False:
        return 1.0
    return float(c.init_div_is_residual)


@torch.no_grad()
def init_weights(module: nn.Module, config: MPTConfig) -> None:
    """Initialise every parameter of `module` (a whole model or one block) in place."""
    weight_init = _weight_init_fn(config)
    div = _residual_div(config)
    c = config.init_config
    for m in module.modules():
        if isinstance(m, nn.Linear):
            fused = getattr(m, "_fused", None)
            if fused is not None:
                dim, splits = fused
                bounds = [0, *splits, m.weight.shape[dim]]
                for lo, hi in itertools.pairwise(bounds):
                    weight_init(m.weight.narrow(dim, lo, hi - lo))
            else:
                weight_init(m.weight)
            if getattr(m, "_is_residual", False) and div != 1.0:
                m.weight.div_(div)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            if c.emb_init_std is not None:
                nn.init.normal_(m.weight, std=c.emb_init_std)
            elif c.emb_init_uniform_lim is not None:
                lim = c.emb_init_uniform_lim
                lo, hi = (-lim, lim) if isinstance(lim, int | float) else (lim[0], lim[1])
                nn.init.uniform_(m.weight, lo, hi)
            else:
                weight_init(m.weight)
        elif isinstance(m, LayerNorm | RMSNorm):
            nn.init.ones_(m.weight)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
