"""Training and inference fast on any x86-64 CPU, GPU or not: what the CPU can do, and kernels chosen from that.

Modules: ``features`` (CPUID: the instruction-set level every kernel path is chosen from), ``threads`` (math
threads, allocator and MKL settings, set before the first matrix multiply), ``kernels`` + ``kernels.cc`` (the fused
C++ kernels, compiled once per machine), ``ops`` (the fast composites built on them), ``fast_paths`` (swapping them
into a model of a family that has them), ``agreement`` (each kernel against its composed form). Each family's own
replacements stay in its package (``models/<family>/cpu_fast.py``), next to the model they rewrite.
"""
