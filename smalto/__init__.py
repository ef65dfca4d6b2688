"""smalto: pretrain, evaluate, convert and run (generate, chat) MPT-family language models."""

from smalto.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "load"]


def load(path: str, **kwargs):
    """Load an HF MPT folder (or a smalto checkpoint) as an `MPTForCausalLM`."""
    from smalto.model.mpt import MPTForCausalLM

    return MPTForCausalLM.from_pretrained(path, **kwargs)
