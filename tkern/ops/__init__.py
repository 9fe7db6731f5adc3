"""One module per op: its Triton kernels, host launchers and autograd.Function."""
