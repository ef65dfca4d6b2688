"""smalto/adapters/nf4.py: the NF4 code book and quantizer against QLoRA's definition, NF4Linear's forward and
gradients, apply_nf4 on MPT and LLaMA-family models, activation checkpointing, compile, FSDP2 over two gloo ranks,
and `smalto.load(quantize="nf4")`."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from smalto.adapters.nf4 import NF4_CODE, NF4Linear, apply_nf4
from smalto.errors import ConfigError
from smalto.model.mpt import MPTForCausalLM
from smalto.quant import QuantSpec, quantize
from tests.helpers import tiny_config

# QLoRA's NF4 data type as bitsandbytes publishes it (functional.py, `create_normal_map()` printed in float32)
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def paper_code() -> torch.Tensor:
    """NF4 from its definition (QLoRA §3, appendix E): 8 positive and 7 negative quantiles of N(0, 1) taken at
    evenly spaced probabilities from 1 − δ to ½, δ = ½(1/30 + 1/32) (the mean of the 2·15 and 2·16 point rules),
    an exact zero, normalised to [-1, 1]."""
    delta = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat((pos, torch.zeros(1, dtype=torch.float64), neg)).sort().values
    return values / values.abs().max()


def reference_nf4(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, ŵ) of QLoRA's quantizer in float64: per block of the row-major weight, absmax scaling, then the
    nearest NF4 value."""
    code = paper_code()
    blocks = w.double().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = (blocks / absmax.clamp(min=1e-30))[..., None].sub(code).abs().argmin(dim=-1)
    return idx.reshape(w.shape), (code[idx] * absmax).reshape(w.shape)


def weights(n: int = 96, k: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(n, k, generator=g)
    w[3] *= 30  # a row of outliers
    w[5, 7] = 1.5  # one outlier in a block
    w[7] = 0.0  # an all-zero row
    return w.to(torch.bfloat16)


def linear(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    lin.weight.data.copy_(w)
    if bias:
        lin.bias.data.copy_(torch.linspace(-1, 1, w.shape[0]))
    return lin


def test_the_code_book_is_qloras():
    assert NF4_CODE == tuple(PUBLISHED_NF4)
    assert torch.allclose(paper_code(), torch.tensor(PUBLISHED_NF4, dtype=torch.float64), atol=1e-7)
    torchao_code = NF4Linear.from_linear(linear(weights())).weight.nf4  # the table torchao quantizes with
    assert torch.allclose(torchao_code.double(), paper_code(), atol=2e-3)


def test_codes_round_trip_and_match_the_reference_quantizer():
    w = weights()
    q = NF4Linear.from_linear(linear(w), double_quant=False)
    back = q.dequantize(torch.float32).double()
    idx, ref = reference_nf4(w.float())
    absmax = w.double().reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64).reshape(w.shape)
    code = paper_code()
    # the stored values are code-book values times the block's absmax (to bf16 rounding of the code)
    got = back / absmax.clamp(min=1e-30)
    nearest = (got[..., None] - code).abs().min(dim=-1)
    assert float(nearest.values[absmax > 0].max()) < 4e-3
    # the same code as QLoRA's nearest-value rule, except within bf16 rounding of a midpoint between two codes
    differ = nearest.indices != idx
    assert float(differ.float().mean()) < 0.005
    mid = (code[:-1] + code[1:]) / 2
    x = (w.double() / absmax.clamp(min=1e-30))[differ]
    assert bool(((x[:, None] - mid).abs().min(dim=1).values < 8e-3).all())
    assert float((back - ref)[~differ].abs().max()) <= float(absmax.max()) * 4e-3
    # exact code-book values survive; a zero row stays zero; the block's absmax is exact
    exact = torch.tensor(PUBLISHED_NF4 * 16).reshape(2, 128) * 0.03
    r = NF4Linear.from_linear(linear(exact.float()), double_quant=False).dequantize(torch.float32)
    assert torch.allclose(r, exact, atol=0.03 * 4e-3, rtol=0)
    assert back[7].abs().max() == 0
    assert torch.equal(back.abs().reshape(-1, 64).amax(dim=1), absmax.reshape(-1, 64)[:, 0])
    # the worst error is half the widest gap of the code book (−1 to −0.696), in units of the block's absmax
    err = (back - w.double()).abs() / absmax.clamp(min=1e-30)
    assert float(err.max()) <= (1 - 0.6961928) / 2 + 4e-3


def test_double_quantization_costs_little_accuracy_and_saves_memory():
    w = weights(256, 512)
    plain = NF4Linear.from_linear(linear(w), double_quant=False)
    dq = NF4Linear.from_linear(linear(w), double_quant=True)
    e_plain = (plain.dequantize(torch.float32).double() - w.double()).abs().mean()
    e_dq = (dq.dequantize(torch.float32).double() - w.double()).abs().mean()
    assert float(e_dq) <= 1.05 * float(e_plain)
    # each scale is within one int8 step of its group: (absmax − mean) in 256 steps over the group's range
    t = dq.weight
    scales = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size).double()
    true = w.double().reshape(-1, 64).abs().amax(dim=1)
    centred = (true - true.mean()).reshape(-1, t.scaler_block_size)
    step = (2 * centred.abs().amax(dim=1, keepdim=True) / 256).expand_as(centred).reshape(-1)
    assert bool(((scales - true).abs() <= step + true.abs() * 2**-7 + 1e-6).all())
    n = w.numel()
    assert plain.storage_bytes() == n // 2 + 4 * n // 64  # 4 bits + a float32 absmax per 64
    assert dq.storage_bytes() < n // 2 + n // 64 + 4 * n // (64 * 64)  # 4 bits + ~8 bits per 64
    assert dq.storage_bytes() < 0.93 * plain.storage_bytes()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_forward_is_x_times_the_dequantized_weight_and_only_x_gets_a_gradient(double_quant, x_dtype):
    q = NF4Linear.from_linear(linear(weights(), bias=True), double_quant=double_quant)
    assert (q.in_features, q.out_features) == (256, 96)
    assert all(not p.requires_grad for p in q.parameters())
    x = torch.randn(2, 5, 256, dtype=x_dtype, requires_grad=True)
    y = q(x)
    w = q.dequantize(x_dtype)
    assert y.dtype == x_dtype
    assert torch.allclose(y, x @ w.T + q.bias.to(x_dtype), atol=1e-2 if x_dtype == torch.bfloat16 else 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, atol=1e-2 if x_dtype == torch.bfloat16 else 1e-5)
    assert all(p.grad is None for p in q.parameters())


def test_refusals():
    with pytest.raises(ConfigError, match="block size 64 does not divide"):
        NF4Linear.from_linear(nn.Linear(10, 3))
    model = MPTForCausalLM(tiny_config())
    apply_nf4(model)
    with pytest.raises(ConfigError, match="already NF4"):
        apply_nf4(model)


def model_pair(**overrides) -> tuple[MPTForCausalLM, MPTForCausalLM]:
    torch.manual_seed(0)
    ref = MPTForCausalLM(tiny_config(**overrides)).to(torch.bfloat16)
    q = MPTForCausalLM(tiny_config(**overrides)).to(torch.bfloat16)
    q.load_state_dict(ref.state_dict())
    return ref, q


LLAMA = {
    "no_bias": True,
    "learned_pos_emb": False,
    "norm_type": "rmsnorm",
    "attn_config": {"rope": True, "kv_n_heads": 2},
    "ffn_config": {"ffn_type": "mptglu", "ffn_hidden_size": 128, "ffn_act_fn": {"name": "silu"}},
}


@pytest.mark.parametrize(
    "overrides, per_block",
    [({"no_bias": False}, 4), (LLAMA, 5)],  # MPT: Wqkv, out_proj, up, down; LLaMA adds gate_proj
    ids=["mpt", "llama"],
)
def test_apply_nf4_replaces_the_block_linears_and_the_model_stays_close(overrides, per_block):
    ref, q = model_pair(**overrides)
    before = {n: p.clone() for n, p in q.named_parameters() if ".blocks." not in n or "norm" in n}
    assert apply_nf4(q) == per_block * q.config.n_layers
    names = {n for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert {n.rsplit(".", 1)[1] for n in names} == (
        {"Wqkv", "out_proj", "up_proj", "down_proj"} | ({"gate_proj"} if per_block == 5 else set())
    )
    assert not any(type(m) is nn.Linear for m in q.transformer.modules())
    for n, p in q.named_parameters():  # embeddings and norms unchanged and still trainable
        if n in before:
            assert torch.equal(p, before[n]) and p.requires_grad
    ids = torch.randint(0, q.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), q(ids).logits.float()
        # the NF4 model is the 16-bit model of its dequantized weights
        twin = MPTForCausalLM(q.config).to(torch.bfloat16)
        twin.load_state_dict(ref.state_dict())
        for n in names:
            twin.get_submodule(n).weight.copy_(q.get_submodule(n).dequantize())
        assert torch.equal(twin(ids).logits.float(), b)
        # closer to the 16-bit model than int4 absmax with the same blocks (NF4's point: normal weights)
        _, int4 = model_pair(**overrides)
        c = quantize(int4, QuantSpec(format="int4", group_size=64, symmetric=True))(ids).logits.float()
    assert float((b - a).pow(2).mean()) < float((c - a).pow(2).mean())
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9
    q(ids, labels=ids).loss.backward()  # the gradient crosses the NF4 layers to the embedding
    assert q.transformer.wte.weight.grad is not None and q.transformer.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in q.modules() if isinstance(m, NF4Linear) for p in m.parameters())


def test_activation_checkpointing_and_compile_give_the_same_step():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    _, q = model_pair(no_bias=True)
    apply_nf4(q)
    ids = torch.randint(0, q.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    loss = q(ids, labels=ids).loss
    loss.backward()
    grad = q.transformer.wte.weight.grad.clone()
    blocks = q.transformer.blocks
    for i in range(len(blocks)):
        blocks[i] = checkpoint_wrapper(blocks[i])
    for block in blocks:
        block.compile(backend="aot_eager")  # dynamo + AOT autograd trace NF4; inductor's codegen is not NF4's
    q.zero_grad()
    again = q(ids, labels=ids).loss
    again.backward()
    assert torch.allclose(again, loss) and torch.allclose(q.transformer.wte.weight.grad, grad)


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from smalto.train.parallel import close_world, init_world, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    world = init_world("cpu")
    try:
        torch.set_num_threads(1)
        results = {}
        for dq in (True, False):
            _, q = model_pair(d_model=128, no_bias=True)
            apply_nf4(q, double_quant=dq)
            ids = torch.arange(32).reshape(2, 16) * 7 % q.config.vocab_size
            # the trainer's order and FSDP2 policy: checkpointing, then FSDP2 with bf16 parameters
            parallelize(q, world, activation_checkpointing=True, bf16=True)
            wqkv = q.transformer.blocks[0].attn.Wqkv
            stored = wqkv.weight if dq else wqkv.weight_codes
            local = stored.to_local()
            local = local.quantized_data if dq else local
            out_ = q(ids, labels=ids)
            out_.loss.backward()
            grad = q.transformer.wte.weight.grad.full_tensor()
            results[dq] = (out_.logits.detach(), grad, local.numel(), type(stored).__name__)
        if rank == 0:
            torch.save(results, out)
    finally:
        close_world(world)


def test_fsdp2_shards_the_frozen_nf4_base(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.pt"
    mp.spawn(_fsdp_worker, args=(port, str(out)), nprocs=2)
    results = torch.load(out, weights_only=True)
    for dq in (True, False):
        _, q = model_pair(d_model=128, no_bias=True)
        apply_nf4(q, double_quant=dq)
        ids = torch.arange(32).reshape(2, 16) * 7 % q.config.vocab_size
        ref = q(ids, labels=ids)
        ref.loss.backward()
        logits, grad, local_numel, kind = results[dq]
        assert kind == "DTensor"
        assert local_numel == 384 * 128 // 2 // 2  # half of the 4-bit Wqkv on each rank
        assert torch.allclose(logits, ref.logits, atol=1e-2)
        assert torch.allclose(grad, q.transformer.wte.weight.grad, atol=1e-3, rtol=1e-2)


def test_load_quantizes_to_nf4_and_refuses_a_quantized_folder(tmp_path):
    import smalto
    from smalto.hf.save import save_pretrained
    from smalto.quant.folder import save_quantized

    ref, _ = model_pair(no_bias=True)
    save_pretrained(ref, tmp_path / "hf")
    model = smalto.load(tmp_path / "hf", quantize="nf4")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 4 * ref.config.n_layers
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95
    save_quantized(quantize(MPTForCausalLM(tiny_config()), "int8"), tmp_path / "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        smalto.load(tmp_path / "int8", quantize="nf4")
    assert math.isfinite(float(b.sum()))
