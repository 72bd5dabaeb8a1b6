"""attnzoo: fused, memory-efficient attention operators for PyTorch (CPU first).

Importing the package loads the C++ extension, which registers the
``torch.ops.attnzoo.*`` operators.
"""
import torch  # noqa: F401  (the extension links against the loaded torch)

from . import _build_info  # noqa: F401  first: refuses a torch other than the one attnzoo was built against
from . import _C  # noqa: F401  registers torch.ops.attnzoo.*
from . import convert, flex, layouts, models, ops
from .flex import flex_attention
from .models import from_pretrained
from .ops import (alibi_slopes, attention, attention_weights, block_sparse_attention, linear_attention,
                  linformer_attention, longformer_attention, lsh_attention, rotary, shaw_attention, t5_relative_bucket)

__version__ = "0.1.0"
__all__ = ["ops", "attention", "attention_weights", "alibi_slopes", "t5_relative_bucket", "rotary",
           "linformer_attention", "linear_attention", "block_sparse_attention", "shaw_attention",
           "lsh_attention", "longformer_attention", "flex_attention", "flex",
           "layouts", "models", "convert", "from_pretrained", "engine_isa", "__version__"]


def engine_isa() -> str:
    """The instruction set of the attention engine build chosen for this CPU."""
    return _C.engine_isa()
