"""tkern's performance harness: ``python -m perf --help``.

Importing this package decides the backend before triton or tkern are imported: without CUDA,
``TRITON_INTERPRET=1`` is set so that tkern's kernels run in Triton's interpreter (the same code
path as on a GPU, only slow) instead of falling back to eager PyTorch.
"""

import os

import torch

# perf.static_cost compiles the kernels for a GPU in a process of its own (TKERN_STATIC_COST=1):
# there they must stay compilable JITFunctions
if not torch.cuda.is_available() and not os.environ.get("TKERN_STATIC_COST"):
    os.environ["TRITON_INTERPRET"] = "1"
