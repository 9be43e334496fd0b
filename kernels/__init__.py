"""sdmp_fast.kernels: CUDA C++ kernels for the SDMP losses and mixing, with reference fallbacks."""
