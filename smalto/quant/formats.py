"""The weight formats: what a quantized weight matrix holds, how a float matrix becomes one and back.

    QuantSpec               format (int8 | int4), group size, symmetric or not; `quantization_config` in config.json
    quantize_weight(w, s)   (N, K) float → {"qweight", "scales"[, "zeros"]} tensors
    dequantize_weight(...)  those tensors → the (N, K) float matrix they stand for

int8: one scale per output row (symmetric): w ≈ q · s, q ∈ [-127, 127] int8, s = max|w_row| / 127.
    Error bound: |w − q·s| ≤ s/2.
int4: one scale per `group_size` inputs of a row, two 4-bit values per uint8 (input 2j in the low nibble, 2j+1 in
    the high one), stored (N, K/2):
      asymmetric (default): w ≈ (q − 8) · s + z, q ∈ [0, 15], s = (max − min) / 15, z = min + 8·s (a float zero
        point, as gpt-fast / torchao's tinygemm layout). Bound: |w − ŵ| ≤ s/2 + |z|·2⁻⁸ (z is rounded to 16 bits).
      symmetric: w ≈ (q − 8) · s, q − 8 ∈ [−8, 7], s = max|w| / 7. Bound: s/2.
Scales and zero points are rounded to bfloat16 (float16 for an fp16 model) before the integers are chosen, and
rounded up, so the bounds hold for the stored values; they are kept in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from smalto.errors import ConfigError, check_choice

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How the linear layers are quantized. group_size and symmetric concern int4 only (int8 is per row); head:
    the output matrix too (the tied embedding / unembedding, or an untied lm_head), in the same format."""

    format: str
    group_size: int = 128
    symmetric: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        check_choice("quantize", self.format, FORMATS)
        if self.format == "int4":
            check_choice("group_size", self.group_size, GROUP_SIZES)

    def to_config(self) -> dict:
        """The `quantization_config` written to config.json."""
        d: dict = {"quant_method": "smalto", "format": self.format}
        if self.format == "int4":
            d.update(group_size=self.group_size, symmetric=self.symmetric)
        if self.head:
            d["quantize_head"] = True
        return d

    @classmethod
    def from_config(cls, d: object, where: str) -> QuantSpec:
        if not isinstance(d, dict) or d.get("quant_method") != "smalto":
            raise ConfigError(
                f"{where}: quantization_config {d!r} is not one smalto wrote (quant_method 'smalto'); smalto "
                "loads its own int8 / int4 folders (`smalto convert --quantize`)"
            )
        return cls(
            format=d.get("format"),  # type: ignore[arg-type]  # checked in __post_init__
            group_size=int(d.get("group_size", 128)),
            symmetric=bool(d.get("symmetric", False)),
            head=bool(d.get("quantize_head", False)),
        )

    def describe(self) -> str:
        head = ", head too" if self.head else ""
        if self.format == "int8":
            return f"int8 (per-row scales{head})"
        return f"int4 (groups of {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}{head})"


def check_shape(spec: QuantSpec, name: str, in_features: int) -> None:
    """Refuse a layer whose input size the int4 group size does not divide."""
    if spec.format == "int4" and in_features % spec.group_size:
        raise ConfigError(
            f"group_size {spec.group_size} does not divide the input size {in_features} of {name}; "
            f"choose a group size that divides it ({', '.join(str(g) for g in GROUP_SIZES if in_features % g == 0) or 'none of ' + str(GROUP_SIZES)})"
        )


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type scales are rounded to: float16 for an fp16 model (its range), bfloat16 otherwise."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _round_up(s: Tensor, dtype: torch.dtype) -> Tensor:
    """s (float32, > 0) rounded to `dtype`, upwards, so that a range divided by it still fits the integers."""
    r = s.to(dtype)
    low = r.float() < s
    return torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def quantize_weight(w: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """(N, K) float weight → the stored tensors, computed in float32 on w's device, scales in w's 16-bit type."""
    N, K = w.shape
    wf = w.detach().float()
    sd = scale_dtype(w.dtype)
    out_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if spec.format == "int8":
        s = _round_up(wf.abs().amax(dim=1).clamp(min=1e-12) / 127, sd)
        q = torch.round(wf / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": s.to(out_dtype)}
    g = spec.group_size
    wg = wf.reshape(N, K // g, g)
    if spec.symmetric:
        s = _round_up(wg.abs().amax(dim=2).clamp(min=1e-12) / 7, sd)
        q = torch.round(wg / s.float()[..., None]).clamp(-8, 7) + 8
        zeros = None
    else:
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        s = _round_up((hi - lo).clamp(min=1e-12) / 15, sd)
        z = (lo + 8 * s.float()).to(sd)
        q = torch.round((wg - z.float()[..., None]) / s.float()[..., None] + 8).clamp(0, 15)
        zeros = z.to(out_dtype)
    q = q.to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    tensors = {"qweight": packed.contiguous(), "scales": s.to(out_dtype)}
    if zeros is not None:
        tensors["zeros"] = zeros
    return tensors


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 → (N, K) uint8 values 0–15, input 2j from the low nibble."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_weight(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype,
) -> Tensor:
    """The (N, K) matrix in `dtype` that the stored tensors stand for (computed in float32, then rounded once)."""
    if spec.format == "int8":
        if scales.dtype == dtype:  # q is exact in any float type, so one rounded product: no float32 copy
            return qweight.to(dtype) * scales[:, None]
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    q = unpack_int4(qweight).float() - 8
    N, K = q.shape
    w = q.reshape(N, K // spec.group_size, spec.group_size) * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(N, K).to(dtype)


def error_bound(w: Tensor, tensors: dict[str, Tensor], spec: QuantSpec) -> Tensor:
    """The largest error the format allows for each weight of w (the module docstring's bounds), shaped like w."""
    s = tensors["scales"].float()
    if spec.format == "int8":
        return (s / 2)[:, None].expand_as(w)
    bound = s / 2
    if "zeros" in tensors:
        bound = bound + tensors["zeros"].float().abs() * 2**-8
    return bound.repeat_interleave(spec.group_size, dim=1)
