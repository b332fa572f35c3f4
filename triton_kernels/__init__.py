"""Triton kernels for the pyquant packed 2-bit format (one module per kernel variant)."""
