"""Sizes written as text, one reading for every command: `--shard-size 5GB` in `smalto data` and `smalto convert`."""

from __future__ import annotations

import re

from smalto.errors import ConfigError

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """'5GB' → 5e9 bytes (decimal, as transformers), '2GiB' → 2·2^30, 1000 → 1000."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ConfigError(
            f"shard size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes"
        )
    n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ConfigError(f"shard size {size!r} must be positive")
    return n
