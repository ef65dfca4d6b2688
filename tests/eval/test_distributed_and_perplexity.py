"""Two gloo ranks give the single-process results; perplexity equals the token-weighted loss of plain forwards."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from smalto.eval.perplexity import perplexity
from smalto.eval.runner import evaluate
from tests.eval.conftest import tiny_mpt

TASKS = ["copa", "winograd", "triviaqa_small", "lambada_openai_small"]


def _worker(rank: int, world: int, port: int, out: str, tok_dir: str, data_root: str, shards: str) -> None:
    from transformers import AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        model = tiny_mpt()
        res = evaluate(
            model, tok, TASKS, data_root=data_root, limit=7, batch_size=3, log_samples=True
        ).to_dict(samples=True)
        ppl = perplexity(model, shards, batch_size=2)
        if rank == 0:
            Path(out).write_text(json.dumps({"icl": res, "ppl": ppl}))
    finally:
        torch.distributed.destroy_process_group()


def _shards(tmp_path: Path, vocab: int) -> Path:
    from smalto.data.mds import MDSWriter

    rng = np.random.default_rng(0)
    w = MDSWriter(tmp_path / "data" / "val")
    for n in (40, 40, 17, 300, 5):  # 300 > max_seq_len 128: cut into windows
        w.write(rng.integers(0, vocab, n).astype(np.int32))
    w.finish()
    return tmp_path / "data"


def _strip_time(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d["icl"].pop("seconds")
    d["ppl"].pop("seconds")
    for t in d["icl"]["tasks"]:
        t.pop("seconds")
    return d


def test_two_ranks_equal_one(tmp_path, neox_tokenizer_dir, data_root, tokenizer):
    shards = _shards(tmp_path, 50432)
    out = tmp_path / "dist.json"
    port = 29500 + os.getpid() % 1000
    mp.spawn(
        _worker, args=(2, port, str(out), str(neox_tokenizer_dir), str(data_root), str(shards)), nprocs=2
    )
    model = tiny_mpt()
    single = {
        "icl": evaluate(
            model, tokenizer, TASKS, data_root=data_root, limit=7, batch_size=3, log_samples=True
        ).to_dict(samples=True),
        "ppl": perplexity(model, shards, batch_size=2),
    }
    dist, single = _strip_time(json.loads(out.read_text())), _strip_time(single)
    for a, b in zip(dist["icl"]["tasks"], single["icl"]["tasks"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 7
        for ra, rb in zip(a["samples"], b["samples"], strict=True):
            assert ra.keys() == rb.keys() and ra["index"] == rb["index"] and ra["correct"] == rb["correct"]
            if "mean_ce" in ra:
                assert np.allclose(ra["mean_ce"], rb["mean_ce"], atol=1e-4)
    assert dist["ppl"]["tokens"] == single["ppl"]["tokens"]
    assert math.isclose(dist["ppl"]["loss"], single["ppl"]["loss"], rel_tol=1e-5)


def test_perplexity_equals_plain_loss(tmp_path, mpt):
    shards = _shards(tmp_path, 50432)
    calls: list[tuple[int, int]] = []
    got = perplexity(mpt, shards, batch_size=3, on_batch=lambda done, total: calls.append((done, total)))
    rows = calls[-1][1]
    assert calls == [(min(b + 3, rows), rows) for b in range(0, rows, 3)]  # progress after every batch
    from smalto.data.dataset import MDSDataset

    ds = MDSDataset(str(shards / "val"))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            toks = torch.as_tensor(ds.tokens(i).astype(np.int64))
            for s in range(0, len(toks), 128):
                w = toks[s : s + 128][None]
                if w.shape[1] < 2:
                    continue
                loss = mpt(w, labels=w).loss  # mean over the window's predicted tokens
                total += float(loss) * (w.shape[1] - 1)
                count += w.shape[1] - 1
    assert got["tokens"] == count == 39 + 39 + 16 + 299 + 4 - 2  # the 300-token sample: windows 128+128+44
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-5)
