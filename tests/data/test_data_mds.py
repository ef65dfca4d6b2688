"""MDS compatibility, checked against a minimal reader and writer written here from the format description
(Streaming's index.json version 2; shard = uint32 n, uint32 offsets[n+1], config JSON, samples; a sample is the
uint32 sizes of its variable columns then each column; `ndarray:D` = byte (ndim<<2 | shape dtype code), shape, values)."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from smalto.data.dataset import MDSDataset
from smalto.data.mds import MDSWriter
from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards

# ---- an independent reader ----


def read_split(folder: Path) -> list[np.ndarray]:
    index = json.loads((folder / "index.json").read_text())
    assert index["version"] == 2
    samples = []
    for shard in index["shards"]:
        assert shard["format"] == "mds"
        raw_name = shard["raw_data"]["basename"]
        if shard["zip_data"]:
            import zstandard

            data = (
                zstandard.ZstdDecompressor()
                .decompressobj()
                .decompress((folder / shard["zip_data"]["basename"]).read_bytes())
            )
            assert shard["zip_data"]["basename"] == raw_name + ".zstd"
        else:
            data = (folder / raw_name).read_bytes()
        assert len(data) == shard["raw_data"]["bytes"]
        (n,) = struct.unpack_from("<I", data, 0)
        assert n == shard["samples"]
        offsets = struct.unpack_from(f"<{n + 1}I", data, 4)
        config = json.loads(data[4 + 4 * (n + 1) : offsets[0]])
        assert config["column_names"] == shard["column_names"]
        for i in range(n):
            sample = data[offsets[i] : offsets[i + 1]]
            cols = {}
            sizes = [s for s in shard["column_sizes"]]
            pos = 0
            for c, s in enumerate(sizes):
                if s is None:
                    (sizes[c],) = struct.unpack_from("<I", sample, pos)
                    pos += 4
            for name, enc, size in zip(shard["column_names"], shard["column_encodings"], sizes, strict=True):
                cols[name] = (enc, sample[pos : pos + size])
                pos += size
            enc, blob = cols["tokens"]
            dtype = enc.split(":")[1]
            ndim, code = blob[0] >> 2, blob[0] & 3
            shape_dtype = ["<u1", "<u2", "<u4", "<u8"][code]
            shape = np.frombuffer(blob, shape_dtype, count=ndim, offset=1)
            values = np.frombuffer(blob, dtype, offset=1 + ndim * (1 << code))
            assert values.shape == tuple(shape)
            samples.append(values)
    return samples


# ---- an independent writer ----


def write_split(folder: Path, rows: list[dict], columns: dict[str, str], per_shard: int) -> None:
    """Columns sorted by name; encodings: ndarray:D, bytes, str, int (fixed 8 bytes)."""
    folder.mkdir(parents=True)
    names = sorted(columns)
    encs = [columns[n] for n in names]
    sizes = [8 if e == "int" else None for e in encs]
    shards = []
    for s, start in enumerate(range(0, len(rows), per_shard)):
        chunk = rows[start : start + per_shard]
        config = {
            "version": 2,
            "format": "mds",
            "compression": None,
            "hashes": [],
            "size_limit": None,
            "column_names": names,
            "column_encodings": encs,
            "column_sizes": sizes,
        }
        cfg_bytes = json.dumps(config, sort_keys=True).encode()
        blobs = []
        for row in chunk:
            head, body = b"", b""
            for n, e in zip(names, encs, strict=True):
                v = row[n]
                if e == "int":
                    body += struct.pack("<q", v)
                    continue
                if e.startswith("ndarray:"):
                    b = (
                        bytes([(1 << 2) | 1])
                        + struct.pack("<H", len(v))
                        + np.asarray(v, e.split(":")[1]).tobytes()
                    )
                elif e == "bytes":
                    b = v
                else:
                    b = v.encode()
                head += struct.pack("<I", len(b))
                body += b
            blobs.append(head + body)
        start_off = 4 + 4 * (len(chunk) + 1) + len(cfg_bytes)
        offsets = np.cumsum([start_off, *(len(b) for b in blobs)]).astype("<u4")
        data = struct.pack("<I", len(chunk)) + offsets.tobytes() + cfg_bytes + b"".join(blobs)
        name = f"shard.{s:05d}.mds"
        (folder / name).write_bytes(data)
        shards.append(
            {
                **config,
                "samples": len(chunk),
                "raw_data": {"basename": name, "bytes": len(data), "hashes": {}},
                "zip_data": None,
            }
        )
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


# ---- tests ----


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("dtype", ["int32", "uint16"])
def test_smalto_shards_parse_with_independent_reader(tmp_path, compression, dtype):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 50000, size=int(rng.integers(1, 300))) for _ in range(500)]
    w = MDSWriter(tmp_path / "split", dtype=dtype, compression=compression, size_limit=20_000)
    for s in samples:
        w.write(s)
    shards = w.finish()
    assert len(shards) > 1, "size limit should split the data into several shards"
    for shard in shards:
        assert shard["raw_data"]["bytes"] <= 20_000
    got = read_split(tmp_path / "split")
    assert len(got) == len(samples)
    for a, b in zip(got, samples, strict=True):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)


def test_tokenize_output_parses_with_independent_reader(tmp_path, tokenizer_dir, tok, eos_id):
    docs = [f"Doc {i}: " + "lorem ipsum " * (i % 17) for i in range(200)]
    (tmp_path / "in.txt").write_text("\n".join(docs) + "\n")
    tokenize_to_shards(
        TokenizeConfig(
            sources=[str(tmp_path / "in.txt")],
            out=tmp_path / "out",
            tokenizer=str(tokenizer_dir),
            seq_len=64,
            format="lines",
            compression="zstd",
            progress=False,
        )
    )
    stream = np.concatenate(read_split(tmp_path / "out" / "train"))
    expected = np.concatenate(
        [np.array([*tok.encode(d, add_special_tokens=False).ids, eos_id]) for d in docs]
    )
    n = len(expected) // 64 * 64
    np.testing.assert_array_equal(stream, expected[:n])


def test_foreign_shards_load_in_smalto(tmp_path):
    rng = np.random.default_rng(1)
    rows = [
        {
            "id": i,
            "text": f"row {i}",
            "tokens": rng.integers(0, 60000, size=int(rng.integers(1, 100))).astype(np.uint16),
        }
        for i in range(57)
    ]
    write_split(tmp_path / "ds", rows, {"id": "int", "text": "str", "tokens": "ndarray:uint16"}, per_shard=10)
    ds = MDSDataset(str(tmp_path / "ds"))
    assert len(ds) == 57
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(ds.tokens(i), row["tokens"])


def test_legacy_bytes_tokens_load_as_int64(tmp_path):
    rows = [{"tokens": np.arange(i, i + 8, dtype=np.int64).tobytes()} for i in range(5)]
    write_split(tmp_path / "old", rows, {"tokens": "bytes"}, per_shard=2)
    ds = MDSDataset(str(tmp_path / "old"))
    assert [ds.tokens(i).tolist() for i in range(5)] == [list(range(i, i + 8)) for i in range(5)]
