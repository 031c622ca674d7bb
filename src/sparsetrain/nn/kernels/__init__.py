"""Triton kernels of the model layer, each with a pure-PyTorch reference that stays the oracle (tests compare them
on the GPU at real shapes and on the CPU through Triton's interpreter, `TRITON_INTERPRET=1`)."""
