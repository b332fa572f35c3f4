"""Kernel backends, one module each. ``pyquant.kernels`` is the only caller.

Every backend module defines:

- ``NAME``: its name (``cuda``, ``triton``, ``cpu``, ``torch``);
- ``available() -> bool``: can it run in this process at all (built, imported);
- ``supports(layer, dtype, needs_grad) -> str | None``: ``None`` when it takes this
  ``QuantLinear`` for inputs of ``dtype`` (with or without gradients), else the reason it does
  not (shown by ``kernels.explain``). Decided on what the layer fixes, never on one input;
- ``build(layer) -> state``: the backend's kernel-side state for the layer (its own type, or
  None), built once per layer and device by ``kernels.KernelPlan``;
- ``forward(x, layer, state) -> y``: ``x`` is ``[M, K]`` contiguous on the layer's device, ``y``
  is ``[M, N]`` in ``x``'s dtype; one op of ``torch.ops.pyquant`` (or plain torch ops).

and may define ``forward_traced(x, layer, state) -> y``, what a traced graph (``torch.compile``,
``torch.export``) runs instead of ``forward`` for calls that need no gradient, and
``forward_nograd(x, layer, state) -> y``, what an eager call that needs none runs instead, and
``refresh(layer, state, changed)``, which rewrites in place the parts of ``state`` made from the
tensors named in ``changed`` (a frozenset) after a serving engine refilled them
(``QuantLinear.refresh``).
"""
