"""Weight-only quantization for inference: int8 (per-row scales) and int4 (group-wise, packed two per byte).

    formats.py  QuantSpec; quantize / dequantize a weight matrix; the error bounds
    linear.py   QuantLinear (in place of nn.Linear), QuantHead / QuantEmbedding (the output matrix, `--quantize-head`)
                and `quantize(model, spec)`, applied from outside
    folder.py   quantized folders: save, load, and what `smalto.load(path, quantize=...)` decides
The decode kernel that reads the quantized weights is smalto/kernels/decode_linear.py. docs/quantize.md says how
to use it, why smalto's own format and kernel, and the measurements.
"""

from smalto.quant.formats import FORMATS, GROUP_SIZES, QuantSpec
from smalto.quant.linear import QuantEmbedding, QuantHead, QuantLinear, quant_spec_of, quantize

__all__ = [
    "FORMATS",
    "GROUP_SIZES",
    "QuantEmbedding",
    "QuantHead",
    "QuantLinear",
    "QuantSpec",
    "quant_spec_of",
    "quantize",
]
