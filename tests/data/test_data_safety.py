"""Datasets from strangers: index file names cannot reach outside the dataset and cache folders, damaged shards are
refused when first opened (naming the file), and token ids the model cannot embed are refused at training setup."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import smalto.data.mds
from smalto.data.dataset import MDSDataset
from smalto.data.mds import MDSWriter
from smalto.data.stream import DataConfig, build_loader, check_vocab
from smalto.errors import DataError
from tests import forkrun

REPO = Path(__file__).resolve().parents[2]


def write(
    split: Path,
    n: int = 20,
    compression: str | None = None,
    first: int = 1,
    hashes: tuple[str, ...] = ("sha1",),
) -> Path:
    """n samples of 8 tokens, one shard; sample i starts with first + i. Returns the shard file."""
    w = MDSWriter(split, compression=compression, hashes=hashes)
    for i in range(n):
        w.write(np.array([first + i, 5, 0, 7, 7, 0, 9, 9], np.int32))
    (shard,) = w.finish()
    return split / (shard["zip_data"] or shard["raw_data"])["basename"]


def edit_index(split: Path, edit) -> None:
    index = json.loads((split / "index.json").read_text())
    edit(index["shards"][0])
    (split / "index.json").write_text(json.dumps(index))


# ---- names in the index ----


@pytest.mark.parametrize("kind", ["parent", "absolute", "inner-parent"])
@pytest.mark.parametrize("field", ["raw_data", "zip_data"])
def test_index_names_outside_the_folder_are_refused_and_nothing_is_written(tmp_path, kind, field):
    split = tmp_path / "ds"
    write(split, compression="zstd")
    cache = tmp_path / "cache"
    # where the decompressed shard would land: the cache is cache/<16 hex>/, so ../../ is tmp_path
    target = {
        "parent": ("../../escaped.mds", tmp_path / "escaped.mds"),
        "absolute": (str(tmp_path / "abs" / "escaped.mds"), tmp_path / "abs" / "escaped.mds"),
        "inner-parent": ("sub/../../../escaped.mds", tmp_path / "escaped.mds"),
    }[kind]
    (tmp_path / "abs").mkdir()
    edit_index(split, lambda s: s[field].update(basename=target[0]))
    with pytest.raises(DataError, match=re.escape(f"index.json: shard 0 {field}.basename is '{target[0]}'")):
        MDSDataset(str(split), cache_dir=cache).tokens(0)
    if target[1] is not None:
        assert not target[1].exists()
    assert not any(cache.rglob("*escaped*"))


def test_empty_name_is_refused(tmp_path):
    write(tmp_path / "ds")
    edit_index(tmp_path / "ds", lambda s: s["raw_data"].update(basename=""))
    with pytest.raises(DataError, match=r"raw_data\.basename is '', not a file name"):
        MDSDataset(str(tmp_path / "ds"))


# ---- damaged shards, refused at first open ----


def damage(shard: Path, how: str) -> None:
    data = bytearray(shard.read_bytes())
    n = int(np.frombuffer(data, np.uint32, count=1)[0])
    offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4).copy()
    if how == "truncated":
        data = data[:10]
    elif how == "offsets":  # samples 1 and 2 swap their starts: the table no longer grows
        offsets[[1, 2]] = offsets[[2, 1]]
        data[4 : 4 + 4 * (n + 1)] = offsets.tobytes()
    elif how == "sample size":  # the last sample's tokens claim more bytes than the sample has
        data[offsets[-2] : offsets[-2] + 4] = np.uint32(1000).tobytes()
    elif how == "payload":  # the last token of the last sample
        data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "index_knows", "message"),
    [
        ("truncated", False, r"10 bytes but index.json says \d+"),
        ("truncated", True, "10 bytes cannot hold the offsets of 20 samples"),
        ("offsets", True, "sample offsets are not increasing"),
        ("payload", False, "sha1 hash mismatch"),
    ],
)
def test_damaged_shard_is_refused_at_first_open(tmp_path, how, index_knows, message):
    """`index_knows`: the index was rewritten to match the damaged file's size and lists no hash, as a hostile or
    sloppy writer's would, so only the header checks can catch it."""
    shard = write(tmp_path / "ds")
    damage(shard, how)
    if index_knows:
        size = shard.stat().st_size
        edit_index(tmp_path / "ds", lambda s: s["raw_data"].update(bytes=size, hashes={}))
    ds = MDSDataset(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: .*{message}"):
        ds.tokens(0)  # the damage is in later samples or the whole file: refused when the shard opens


def test_xxhash_digests_are_verified(tmp_path):
    """Streaming's fast xxh* hashes, checked when xxhash is installed (the `data` and `dev` extras install it)."""
    pytest.importorskip("xxhash")
    shard = write(tmp_path / "ds", hashes=("xxh3_64",))
    damage(shard, "payload")
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: xxh3_64 hash mismatch"):
        MDSDataset(str(tmp_path / "ds")).tokens(0)


def test_damaged_sample_names_the_shard(tmp_path):
    shard = write(tmp_path / "ds")
    damage(shard, "sample size")
    edit_index(tmp_path / "ds", lambda s: s["raw_data"].update(hashes={}))
    ds = MDSDataset(str(tmp_path / "ds"))
    assert ds.tokens(0).tolist() == [1, 5, 0, 7, 7, 0, 9, 9]
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: sample 19 is damaged"):
        ds.tokens(19)


def test_cached_shard_is_hashed_when_a_new_process_opens_it(tmp_path):
    write(tmp_path / "ds", compression="zstd")
    cache = tmp_path / "cache"
    MDSDataset(str(tmp_path / "ds"), cache_dir=cache).tokens(0)  # decompresses into the cache
    (cached,) = cache.rglob("shard.00000.mds")
    damage(cached, "payload")
    with pytest.raises(DataError, match=rf"{re.escape(str(cached))}: sha1 hash mismatch"):
        MDSDataset(str(tmp_path / "ds"), cache_dir=cache).tokens(0)


def test_a_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    write(tmp_path / "ds")
    calls = []
    real = smalto.data.mds.verify_hashes
    monkeypatch.setattr(smalto.data.mds, "verify_hashes", lambda *a: calls.append(a[2]) or real(*a))
    ds = MDSDataset(str(tmp_path / "ds"))
    ds.tokens(0)
    ds._open.clear()  # as when more than _OPEN_SHARDS shards are in use
    ds.tokens(1)
    assert len(calls) == 1
    assert MDSDataset(str(tmp_path / "ds"), verify=False).tokens(2)[0] == 3 and len(calls) == 1


# ---- token ids the model cannot embed ----


def dataset(root: Path, meta: dict, first: int = 1) -> Path:
    write(root / "train", first=first)
    (root / "smalto_data.json").write_text(json.dumps(meta))
    return root


def test_token_ids_past_the_vocabulary_are_refused_without_metadata(tmp_path):
    """Data from other tools records no vocabulary size: the first batch's ids are checked."""
    root = dataset(tmp_path / "ds", {"tokenizer": {"eos_id": 0}}, first=5000)
    cfg = DataConfig.from_dict({"sources": [{"path": str(root)}], "seq_len": 8})
    loader = build_loader(cfg, micro_batch_size=2, global_batch_size=4)
    check_vocab([loader, None], 8192)
    with pytest.raises(DataError, match=r"token id 50\d\d, outside the model's vocabulary of 4096 tokens"):
        check_vocab([loader], 4096)


def test_vocab_mismatch_stops_smalto_train_with_both_sizes(tmp_path):
    meta = {"tokenizer": {"name": "gpt-neox-20b", "eos_id": 0, "vocab_size": 50277}}
    root = dataset(
        tmp_path / "ds", meta, first=1000
    )  # ids ≥ 384: the old code died in the embedding at step 1
    recipe = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_seq_len": 8, "vocab_size": 384},
        "data": {"sources": [{"path": str(root)}], "seq_len": 8},
        "train": {
            "max_duration": "2ba",
            "global_batch_size": 4,
            "device": "cpu",
            "precision": "fp32",
            "eval_batches": 0,
        },
        "checkpoint": {"hf_export": None},
        "logging": {"progress": False, "tensorboard": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    p = forkrun.run(
        [sys.executable, "-m", "smalto", "train", str(tmp_path / "r.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "vocabulary of 50277 tokens" in p.stderr and "model.vocab_size is 384" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_merged_index_reads_shards_in_sub_folders(tmp_path):
    """Streaming's merge_index names shards `0/shard.00000.mds`: relative names of plain parts are read (and
    decompressed into the same sub-folder of the cache)."""
    split = tmp_path / "ds"
    write(split, compression="zstd")
    ref = MDSDataset(str(split), cache_dir=tmp_path / "cache_ref").tokens(0)
    (split / "0").mkdir()
    for f in list(split.glob("*.mds*")):
        f.rename(split / "0" / f.name)
    edit_index(
        split, lambda s: [s[k].update(basename="0/" + s[k]["basename"]) for k in ("raw_data", "zip_data")]
    )
    cache = tmp_path / "cache"
    assert MDSDataset(str(split), cache_dir=cache).tokens(0).tolist() == ref.tolist()
    assert list(cache.rglob("0/*.mds"))
