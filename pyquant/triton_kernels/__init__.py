"""Triton kernels for the pyquant packed 2-bit format.

- :mod:`.transform`: fused activation transform (``su * x``, blockwise Hadamard,
  per-4-chunk ``A^T``, per-token constant) and the output pass (split-K sum,
  ``w_scale``, blockwise ``H_out``, ``sv``, bias);
- :mod:`.gemv_splitk`: 1-16 token INT2 GEMV on transformed activations, split-K
  with an atomic or a deterministic reduction, or the output fused when unsplit;
- :mod:`.gemm_dequant`: fused-dequant GEMM (codewords built from ``A``, ``b``,
  ``w_scale`` in registers, fed to ``tl.dot``), output transform in the epilogue;
- :mod:`.autotune`: small config spaces, choices cached on disk per GPU;
- :mod:`.aot_check`: compiles every variant for sm_80/sm_90 without a GPU.

``pyquant.backends.triton`` composes them. Set ``TRITON_INTERPRET=1`` before
anything imports ``triton`` to run them on CPU tensors (tests).
"""
