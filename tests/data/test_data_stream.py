"""The streaming loader: config errors, order, mixing, rank/worker sharding, exact resumption in a new process,
fsspec URLs with a bounded, verified cache."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from smalto.data.mds import MDSWriter
from smalto.data.stream import DataConfig, build_loader
from smalto.errors import ConfigError, DataError
from tests import forkrun

EOS = 0
SEQ = 8


def make_dataset(root: Path, n: int, tag: int, size_limit: int = 400, compression=None) -> Path:
    """n samples of SEQ tokens; sample i of dataset `tag` is recognizable: first token tag*100000 + i + 1."""
    w = MDSWriter(root / "train", compression=compression, size_limit=size_limit)
    for i in range(n):
        w.write(np.array([tag * 100000 + i + 1, 5, EOS, 7, 7, EOS, 9, 9], np.int32))
    w.finish()
    (root / "smalto_data.json").write_text(json.dumps({"tokenizer": {"eos_id": EOS}}))
    return root


def cfg_for(paths, **kw) -> DataConfig:
    sources = [p if isinstance(p, dict) else {"path": str(p)} for p in paths]
    return DataConfig.from_dict({"sources": sources, "seq_len": SEQ, "shuffle_block_size": 50, **kw})


def first_tokens(loader, n):
    it = iter(loader)
    return [next(it)["input_ids"][:, 0].tolist() for _ in range(n)]


def test_config_rejects_unknown_keys_naming_them():
    with pytest.raises(
        ConfigError, match=r"unknown key data.shufle; allowed keys: sources, seq_len, shuffle"
    ):
        DataConfig.from_dict({"sources": [{"path": "x"}], "shufle": True})
    with pytest.raises(ConfigError, match=r"unknown key data.sources\[0\].weight; allowed keys: path, split"):
        DataConfig.from_dict({"sources": [{"path": "x", "weight": 1}]})
    with pytest.raises(ConfigError, match="every data source sets `proportion` or none"):
        DataConfig.from_dict({"sources": [{"path": "x", "proportion": 1}, {"path": "y"}]})


def test_epoch_is_a_seeded_permutation(tmp_path):
    make_dataset(tmp_path / "a", 200, 1)
    loader = build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=4, global_batch_size=8)
    it = iter(loader)
    epoch0 = [x for _ in range(50) for x in next(it)["input_ids"][:, 0].tolist()]  # 50 micro-batches of 4
    epoch1 = [x for _ in range(50) for x in next(it)["input_ids"][:, 0].tolist()]
    assert sorted(epoch0) == sorted(epoch1) == [100000 + i + 1 for i in range(200)]
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)
    again = build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=4, global_batch_size=8)
    assert first_tokens(again, 50) == [epoch0[i : i + 4] for i in range(0, 200, 4)]
    other = build_loader(cfg_for([tmp_path / "a"], seed=5), micro_batch_size=4, global_batch_size=8)
    assert first_tokens(other, 25) != first_tokens(again, 25)


def test_sequence_id_and_labels(tmp_path):
    make_dataset(tmp_path / "a", 10, 1)
    b = next(iter(build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=2, global_batch_size=2)))
    assert b["input_ids"].dtype == b["labels"].dtype == b["sequence_id"].dtype
    assert b["sequence_id"][0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert (b["labels"] == b["input_ids"]).all()


def test_mixing_proportions_hold(tmp_path):
    make_dataset(tmp_path / "a", 300, 1)
    make_dataset(tmp_path / "b", 50, 2)
    cfg = cfg_for(
        [{"path": str(tmp_path / "a"), "proportion": 0.3}, {"path": str(tmp_path / "b"), "proportion": 0.7}],
        epoch_size=1000,
    )
    loader = build_loader(cfg, micro_batch_size=10, global_batch_size=10)
    firsts = np.array(first_tokens(loader, 300)).ravel()  # three epochs
    share_b = (firsts >= 200000).mean()
    assert abs(share_b - 0.7) < 0.005  # exact per epoch (700 of 1000), the whole run is 3 epochs
    # and at every scale: each window of 200 samples is close to the mix (binomial sd ≈ 0.032)
    windows = (firsts[:3000].reshape(15, 200) >= 200000).mean(axis=1)
    assert np.all(np.abs(windows - 0.7) < 0.13)
    # source b (50 samples) is repeated 14 times per epoch, every sample equally
    counts = np.bincount(firsts[firsts >= 200000] - 200001)
    assert counts.min() == counts.max() == 42
    assert loader.source_samples() == {"a": 900, "b": 2100}
    assert loader.source_tokens()["b"] == 2100 * SEQ


def test_repeat_and_choose(tmp_path):
    make_dataset(tmp_path / "a", 40, 1)
    make_dataset(tmp_path / "b", 40, 2)
    cfg = cfg_for([{"path": str(tmp_path / "a"), "repeat": 1.5}, {"path": str(tmp_path / "b"), "choose": 10}])
    loader = build_loader(cfg, micro_batch_size=10, global_batch_size=10)
    firsts = np.array(first_tokens(loader, 7)).ravel()
    assert (firsts < 200000).sum() == 60 and (firsts >= 200000).sum() == 10


def test_ranks_and_workers_split_the_global_batch(tmp_path):
    make_dataset(tmp_path / "a", 160, 1)
    one = first_tokens(build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=2, global_batch_size=8), 12)
    one_steps = [[x for mb in one[i : i + 4] for x in mb] for i in range(0, 12, 4)]
    ranks = [
        first_tokens(
            build_loader(
                cfg_for([tmp_path / "a"], num_workers=2),
                rank=r,
                world_size=2,
                micro_batch_size=2,
                global_batch_size=8,
            ),
            6,
        )
        for r in range(2)
    ]
    two_steps = [[x for mb in ranks[0][i : i + 2] + ranks[1][i : i + 2] for x in mb] for i in range(0, 6, 2)]
    assert one_steps == two_steps


RESUME_SCRIPT = """
import json, sys
import numpy as np
from smalto.data.stream import DataConfig, build_loader
cfg_path, rank, world, workers, steps, state_in, state_out, out = sys.argv[1:]
cfg = DataConfig.from_dict({**json.load(open(cfg_path)), "num_workers": int(workers)})
loader = build_loader(cfg, rank=int(rank), world_size=int(world), micro_batch_size=2, global_batch_size=8)
if state_in != "-":
    loader.load_state_dict(json.load(open(state_in)))
it = iter(loader)
rows = [next(it)["input_ids"].numpy() for _ in range(int(steps) * 4 // int(world))]  # 4 micro-batches per step
np.save(out, np.stack(rows))
if state_out != "-":
    json.dump(loader.state_dict(), open(state_out, "w"))
"""


def _run(tmp: Path, *args) -> np.ndarray:
    out = tmp / f"rows-{abs(hash(args))}.npy"
    res = forkrun.run(
        [sys.executable, "-c", RESUME_SCRIPT, *map(str, args[:-1]), out], capture_output=True, timeout=120
    )
    assert res.returncode == 0, res.stderr.decode()
    return np.load(out)


@pytest.mark.slow
def test_resume_in_new_process_with_other_workers_and_ranks(tmp_path):
    make_dataset(tmp_path / "a", 90, 1)
    make_dataset(tmp_path / "b", 30, 2)
    cfg = {
        "sources": [
            {"path": str(tmp_path / "a"), "proportion": 2},
            {"path": str(tmp_path / "b"), "proportion": 1},
        ],
        "seq_len": SEQ,
        "shuffle_block_size": 16,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    c = tmp_path / "cfg.json"
    # micro-batch 2, global batch 8: one rank takes 4 micro-batches per step. 120 samples → 15 steps per epoch;
    # 20 steps crosses an epoch boundary.
    full = _run(tmp_path, c, 0, 1, 0, 20, "-", "-", "x").reshape(20, 8, SEQ)
    head = _run(tmp_path, c, 0, 1, 0, 13, "-", tmp_path / "state.json", "x").reshape(13, 8, SEQ)
    np.testing.assert_array_equal(head, full[:13])
    assert json.loads((tmp_path / "state.json").read_text())["sample_in_epoch"] == 13 * 8
    tail_workers = _run(tmp_path, c, 0, 1, 3, 7, tmp_path / "state.json", "-", "x").reshape(7, 8, SEQ)
    np.testing.assert_array_equal(tail_workers, full[13:])
    r0 = _run(tmp_path, c, 0, 2, 2, 7, tmp_path / "state.json", "-", "r0").reshape(7, 4, SEQ)
    r1 = _run(tmp_path, c, 1, 2, 0, 7, tmp_path / "state.json", "-", "r1").reshape(7, 4, SEQ)
    np.testing.assert_array_equal(np.concatenate([r0, r1], axis=1), full[13:])


def test_state_must_match_global_batch(tmp_path):
    make_dataset(tmp_path / "a", 40, 1)
    loader = build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=2, global_batch_size=4)
    first_tokens(loader, 1)
    with pytest.raises(RuntimeError, match="middle of a global batch"):
        loader.state_dict()
    first_tokens(loader, 1)
    state = loader.state_dict()
    other = build_loader(cfg_for([tmp_path / "a"]), micro_batch_size=2, global_batch_size=8)
    with pytest.raises(ConfigError, match="global_batch_size was 4, now 8"):
        other.load_state_dict(state)


def test_fsspec_url_with_bounded_verified_cache(tmp_path):
    make_dataset(tmp_path / "a", 200, 1, size_limit=300, compression="zstd")
    local = build_loader(
        cfg_for([tmp_path / "a"], cache_dir=str(tmp_path / "c0")), micro_batch_size=4, global_batch_size=4
    )
    url = f"file://{tmp_path / 'a'}"
    limit = 1500
    remote = build_loader(
        cfg_for([url], cache_dir=str(tmp_path / "cache"), cache_limit=limit),
        micro_batch_size=4,
        global_batch_size=4,
    )
    assert first_tokens(remote, 60) == first_tokens(local, 60)
    cached = [p.stat().st_size for p in (tmp_path / "cache").rglob("shard.*")]
    assert cached and sum(cached) <= limit
    # a damaged shard is caught by the index's hashes
    shard = sorted((tmp_path / "a" / "train").glob("shard.*.zstd"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    fresh = build_loader(
        cfg_for([url], cache_dir=str(tmp_path / "cache2"), shuffle=False),
        micro_batch_size=4,
        global_batch_size=4,
    )
    with pytest.raises(DataError, match="sha1 hash mismatch"):
        first_tokens(fresh, 1)
