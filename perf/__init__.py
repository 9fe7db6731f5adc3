"""tkern's performance harness: ``python -m perf --help``.

Importing this package decides the backend before triton or tkern are imported: without CUDA,
``TRITON_INTERPRET=1`` is set so that tkern's kernels run in Triton's interpreter (the same code
path as on a GPU, only slow) instead of falling back to eager PyTorch.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
