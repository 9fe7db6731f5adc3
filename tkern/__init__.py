"""tkern: fused Triton kernels for BatchNorm, LRN, activation + dropout and weight normalization.

CUDA tensors run compiled Triton kernels; CPU tensors run the same kernels in Triton's interpreter
when TRITON_INTERPRET=1 was set before triton was imported, and otherwise fall back to eager PyTorch
with one warning.
"""

from . import nn
from .activations import ACTIVATIONS
from .conversion import convert
from .ops.activation_dropout import activation_dropout
from .ops.lrn import local_response_norm, local_response_normalization
from .ops.batch_norm import batch_norm
from .ops.weight_norm import weight_norm

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "convert", "activation_dropout", "local_response_norm", "local_response_normalization", "batch_norm", "nn", "weight_norm"]
