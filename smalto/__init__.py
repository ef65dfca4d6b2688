"""smalto: pretrain, evaluate, convert and run (generate, chat) MPT-family language models.

`smalto.load(path, **overrides)` reads every model format smalto knows (see `smalto/load.py`); `smalto.save(model,
path)` writes an HF folder (`smalto.hf.save_pretrained`, imported on first use so `import smalto` stays light).
"""

from typing import Any

from smalto.errors import UserError
from smalto.load import load  # rebinds `smalto.load` (the submodule) to the function
from smalto.version import __version__

__all__ = ["UserError", "__version__", "load", "save"]


def __getattr__(name: str) -> Any:
    if name == "save":
        from smalto.hf.save import save_pretrained

        return save_pretrained
    raise AttributeError(f"module 'smalto' has no attribute {name!r}")
