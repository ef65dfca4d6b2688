"""The mpt-7b-storywriter recipe: StoryWriter's published settings, MPT-7B's shapes (its weights map), and a tiny
override of it that starts from an HF folder and takes steps on CPU with every memory option it sets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from smalto.config import load_config
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from tests.model.helpers import MPT_7B_CONFIG_JSON


def test_the_recipe_has_storywriters_settings_and_mpt_7bs_shapes():
    c = load_config("mpt-7b-storywriter")
    m, a, t, o = c.model, c.model.attn_config, c.train, c.optimizer
    assert (m.max_seq_len, c.data.seq_len, a.alibi, a.alibi_bias_max, a.clip_qkv) == (
        65536,
        65536,
        True,
        16,
        6,
    )
    assert (o.name, o.offload, t.micro_batch_size, t.max_duration) == ("lion", "cpu", 1, "2500ba")
    assert (t.activation_checkpointing, t.loss, t.precision) == (True, "chunked", "bf16")
    assert c.checkpoint.load_from == "models/mpt-7b"
    # every tensor of mosaicml/mpt-7b's config.json has the recipe's shape: its weights load into this model
    base = MPTConfig.from_dict(MPT_7B_CONFIG_JSON, strict=False)
    shapes = {n: p.shape for n, p in MPTForCausalLM(base, device="meta").named_parameters()}
    assert shapes == {n: p.shape for n, p in MPTForCausalLM(m, device="meta").named_parameters()}
    assert m.num_params() == base.num_params() > 6.6e9


def _long_rows(tiny_data: dict[str, str], out: Path, seq: int) -> Path:
    """The tiny corpus's rows concatenated into `seq`-token rows: long documents, as the recipe's data."""
    from smalto.data.dataset import MDSDataset
    from smalto.data.mds import MDSWriter

    src = Path(tiny_data["data"])
    (out / "train").mkdir(parents=True)
    (out / "smalto_data.json").write_text((src / "smalto_data.json").read_text())
    ds = MDSDataset(str(src / "train"))
    stream = np.concatenate([ds.tokens(i) for i in range(len(ds))])
    w = MDSWriter(out / "train")
    for s in range(0, len(stream) - seq + 1, seq):
        w.write(stream[s : s + seq])
    w.finish()
    return out


def test_a_tiny_override_starts_from_an_hf_folder_and_trains(tiny_data, tmp_path):
    from smalto.hf import save_pretrained
    from smalto.train.loop import train_step
    from smalto.train.offload import OffloadedState
    from smalto.train.parallel import close_world, init_world
    from smalto.train.setup import setup

    torch.manual_seed(0)
    shape = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 384}
    # the base: trained at a shorter length with MPT-7B's ALiBi settings, as mosaicml/mpt-7b
    base_cfg = MPTConfig.from_dict(
        {**shape, "max_seq_len": 64, "no_bias": True, "attn_config": {"alibi": True}}
    )
    base = MPTForCausalLM(base_cfg)
    save_pretrained(base, tmp_path / "base", tokenizer=tiny_data["tokenizer"])
    seq = 256
    overrides = [
        *(f"model.{k}={v}" for k, v in shape.items()),
        f"model.max_seq_len={seq}",
        f"data.seq_len={seq}",
        f"data.sources=[{{path: {_long_rows(tiny_data, tmp_path / 'books', seq)}}}]",
        "data.num_workers=0",
        f"tokenizer={tiny_data['tokenizer']}",
        f"checkpoint.load_from={tmp_path / 'base'}",
        f"run_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.precision=fp32",
        "train.compile=false",
        "train.global_batch_size=2",
        "train.eval_batches=0",
        "scheduler.warmup=0ba",  # train_step alone does not advance the schedule: a nonzero lr from the start
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    cfg = load_config("mpt-7b-storywriter", overrides)
    world = init_world("cpu")
    try:
        t = setup(cfg, world)
        assert isinstance(t.optimizer, OffloadedState)  # LION's momentum in CPU memory
        assert (t.micro, t.accum) == (1, 2)
        a = t.model.config.attn_config
        assert (t.model.config.max_seq_len, a.alibi_bias_max, a.clip_qkv) == (seq, 16, 6)
        loaded = t.model.state_dict()
        for name, p in base.state_dict().items():  # the base's weights, under the long-context config
            assert torch.equal(loaded[name], p), name
        it = iter(t.loader)
        batches = [next(it) for _ in range(t.accum)]
        assert batches[0]["input_ids"].shape == (1, seq)
        for _ in range(2):
            train_step(t, batches)
        assert all(math.isfinite(x) for x in t.losses) and len(t.losses) == 2
        assert not torch.equal(t.model.state_dict()["transformer.wte.weight"], base.transformer.wte.weight)
    finally:
        close_world(world)
