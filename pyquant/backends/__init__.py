"""Kernel backends, one module each. ``pyquant.kernels`` is the only caller.

Every backend module defines:

- ``NAME``: its name (``cuda``, ``triton``, ``cpu``, ``torch``);
- ``available() -> bool``: can it run in this process at all (built, imported);
- ``supports(x, pw) -> str | None``: ``None`` when it takes this input and
  weight, else the reason it does not (shown by ``kernels.explain``);
- ``linear(x, pw, bias, cache) -> y``: ``x`` is ``[M, K]`` contiguous, ``y`` is
  ``[M, N]`` in ``x``'s dtype. ``cache`` is a per-layer dict where the backend
  may keep a repacked copy of the weight; the layer clears it whenever its
  tensors change.
"""
