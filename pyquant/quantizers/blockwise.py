"""The block-by-block driver of calibrated quantization, for any method (UniSVQ uses it).

A transformer is quantized one block at a time, each block fed the outputs of the blocks before
it, already quantized (so a block's Hessians and fine-tuning see the error that reaches it):

1. :func:`locate_blocks`: the repeated blocks (the same-class children of a ``ModuleList`` that
   hold the most selected layers), which selected layers each holds, and the layers outside.
2. :func:`capture`: one full-precision pass over the calibration data that checks every
   selected layer's input (bad data fails before any work), records the first block's call
   arguments per batch (:class:`BlockInput`: position embeddings, masks; the KV cache off) and
   collects the Hessians of the layers outside the blocks.
3. :func:`run`: per block, the method's ``quantize_block`` on the block's inputs (and, if asked,
   the full-precision model's outputs of that block), then :func:`advance` to the next block;
   the layers outside the blocks last.
"""
from __future__ import annotations

import contextlib

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibration as cal
from .. import kernels

__all__ = ["BlockInput", "find_blocks", "locate_blocks", "capture", "block_hessians", "advance", "masked_mse", "run"]


def find_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, list[nn.Module]]:
    """``(name, blocks)``: the ``ModuleList`` of same-class children that holds
    the most target layers (the transformer blocks, e.g. ``BertLayer``,
    ``LlamaDecoderLayer``); ``("", [])`` when there is none. A list of one child counts when
    that child holds target layers without being one (a one-layer decoder)."""
    best: tuple[int, str, list] = (0, "", [])
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len({type(c) for c in mod}) != 1:
            continue
        prefix = f"{name}." if name else ""
        if len(mod) == 1 and f"{prefix}0" in targets:  # one layer in a list, not a block of layers
            continue
        n = sum(f.startswith(prefix) for f in targets)
        if n > best[0]:
            best = (n, name, list(mod))
    return best[1], best[2]


def locate_blocks(model: nn.Module, targets: dict[str, nn.Module], method: str
                  ) -> tuple[list[nn.Module], list[dict[str, nn.Module]], dict[str, nn.Module]]:
    """``(blocks, per block its selected layers, the selected layers outside the blocks)``. A
    transformers model whose blocks cannot be found is an error naming what was searched."""
    from ..nn import is_transformers_model  # here: nn imports this package

    block_name, blocks = find_blocks(model, targets)
    prefixes = [f"{block_name}.{i}." if block_name else f"{i}." for i in range(len(blocks))]
    in_block = [{f: m for f, m in targets.items() if f.startswith(p)} for p in prefixes]
    leftovers = {f: m for f, m in targets.items() if not any(f.startswith(p) for p in prefixes)}
    if not blocks and is_transformers_model(model):
        lists = [f"{n} ({len(m)}: {', '.join(sorted({type(c).__name__ for c in m}))})"
                 for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(f"{method}: cannot find the transformer blocks of this {type(model).__name__}: searched "
                         f"for an nn.ModuleList of modules of one class holding the selected layers; its "
                         f"ModuleLists: {'; '.join(lists) or 'none'}")
    return blocks, in_block, leftovers


def hidden_state(out):
    """The hidden state of a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(out).__name__}")


class BlockInput:
    """One calibration batch as a block sees it: its call arguments, with the
    hidden state swappable, and the batch's token mask."""

    def __init__(self, args: tuple, kwargs: dict, mask: torch.Tensor | None):
        self.args, self.kwargs, self.mask = args, dict(kwargs), mask
        if args:
            self.key = None
        elif "hidden_states" in kwargs:
            self.key = "hidden_states"
        else:
            self.key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            if self.key is None:
                raise TypeError("the transformer block was called without a tensor argument")

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.key is None else self.kwargs[self.key]

    def with_hidden(self, x: torch.Tensor) -> "BlockInput":
        if self.key is None:
            return BlockInput((x, *self.args[1:]), self.kwargs, self.mask)
        return BlockInput((), {**self.kwargs, self.key: x}, self.mask)

    def __call__(self, block: nn.Module) -> torch.Tensor:
        return hidden_state(block(*self.args, **self.kwargs))


def masked_mse(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens (padding excluded when the mask fits ``[B, T]``)."""
    err = (y.float() - target.float()).square()
    if mask is not None and err.dim() == 3 and tuple(err.shape[:2]) == tuple(mask.shape):
        m = mask.to(err.device, err.dtype).unsqueeze(-1)
        return (err * m).sum() / (m.sum() * err.shape[-1]).clamp_min(1)
    return err.mean()


class _Stop(BaseException):
    """Ends a capture forward at the first block (a BaseException: nothing on the way catches it)."""


@contextlib.contextmanager
def no_kv_cache(model: nn.Module):
    """A transformers decoder's ``config.use_cache`` off for a while: it would hand its blocks a KV
    cache that fills up call after call, where each calibration forward must be of its batch alone
    (captured block inputs replayable any number of times, fine-tuning forwards independent)."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache:
            config.use_cache = use_cache


@torch.no_grad()
def capture(model: nn.Module, targets: dict[str, nn.Module], first_block: nn.Module | None,
            leftovers: dict[str, nn.Module], data: list, progress: bool = True, desc: str = "calibration",
            stop_at_first_block: bool = False) -> tuple[list[BlockInput], dict[str, torch.Tensor]]:
    """One full-precision pass over the calibration data: checks every selected
    layer's input for NaN/Inf (so bad data fails before any layer is
    quantized), captures the first block's inputs and collects the Hessians
    of the selected layers outside the blocks. ``stop_at_first_block``: the forward ends there
    (the later blocks may have no weights yet); only the layers before it are then checked."""
    inputs: list[BlockInput] = []
    state = {"mask": None}

    def record(module, args, kwargs):
        inputs.append(BlockInput(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                 kwargs, state["mask"]))
        if stop_at_first_block:
            raise _Stop

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True) if first_block is not None else None
    try:
        with no_kv_cache(model), cal.HessianCollector(leftovers) as col, cal.FiniteCheck(targets) as check:
            for i, batch in enumerate(tqdm(data, desc=desc, leave=False, disable=not progress)):
                state["mask"] = col.mask = check.mask = cal.batch_mask(batch)
                col.batch_index = check.batch_index = i
                try:
                    cal.run_model(model, batch, i)
                except _Stop:
                    pass
                col._last = None
                if first_block is not None and len(inputs) != i + 1:
                    raise cal.CalibrationError(f"calibration_data[{i}]: the model's forward did not call its "
                                               "first transformer block exactly once")
            h_left = col.hessians() if leftovers else {}
        missing = sorted(set(targets) - check.called)
        if missing and not stop_at_first_block:
            raise cal.CalibrationError(f"the model's forward on the calibration data never calls {missing}; "
                                       "leave these layers out with filter_fn")
    finally:
        if handle is not None:
            handle.remove()
    return inputs, h_left


@torch.no_grad()
def block_hessians(block: nn.Module, names: dict[str, nn.Module], inputs: list[BlockInput], want_outputs: bool
                   ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The Hessians of ``names`` (layers of ``block``) on ``inputs``, and the block's outputs if wanted."""
    outs = []
    with cal.HessianCollector(dict(names)) as col:
        for i, inp in enumerate(inputs):
            col.mask, col.batch_index = inp.mask, i
            y = inp(block)
            col._last = None
            if want_outputs:
                outs.append(y.detach())
        return col.hessians(), outs


@torch.no_grad()
def advance(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: this block's outputs in place of the hidden states."""
    out = []
    for i, inp in enumerate(inputs):
        y = inp(block).detach()
        if not torch.isfinite(y).all():
            raise FloatingPointError(f"block output on calibration batch {i} holds NaN or Inf")
        out.append(inp.with_hidden(y))
    return out


# quantize_block(index, block, its selected layers, its inputs, the fp model's outputs of it or None)
BlockFn = Callable[[int, nn.Module, dict, list, "list[torch.Tensor] | None"], None]
# quantize_leftover(fqn, layer, its Hessian from the fp model)
LeftoverFn = Callable[[str, nn.Module, torch.Tensor], None]


def run(model: nn.Module, targets: dict[str, nn.Module], data: list, quantize_block: BlockFn,
        quantize_leftover: LeftoverFn, *, method: str, fp_trajectory: bool = False, fp_inputs: bool = False,
        progress: bool = True,
        load_block: Callable[[int, nn.Module], None] | None = None,
        release_block: Callable[[int, nn.Module], None] | None = None) -> None:
    """Quantize ``targets`` block by block (see the module docstring). ``fp_trajectory``: also
    give each block the full-precision model's outputs of it (from fp inputs), computed before
    any of its layers is swapped. ``fp_inputs``: each block gets the full-precision model's inputs
    of it (its Hessians and fine-tuning then see no quantization error from the blocks before;
    implies ``fp_trajectory``) instead of the outputs of the already-quantized blocks. Quantized
    layers run the torch reference math meanwhile, so the result does not depend on which kernels
    this machine has.

    ``load_block(i, block)`` / ``release_block(i, block)``: called before a block is first used and
    after it is done, for a model whose blocks are not all in memory (``pyquant.streaming``); the
    calibration pass then stops at the first block, and there must be no selected layer outside
    the blocks."""
    blocks, in_block, leftovers = locate_blocks(model, targets, method)
    streaming = load_block is not None
    if streaming and (leftovers or not blocks):
        raise ValueError(f"{method} block by block from a checkpoint quantizes the layers of the transformer blocks "
                         f"only; these are outside them: {sorted(leftovers) or 'all (no blocks found)'}")
    if streaming:
        load_block(0, blocks[0])
    inputs, h_left = capture(model, targets, blocks[0] if blocks else None, leftovers, data, progress,
                             desc=f"{method} calibration", stop_at_first_block=streaming)
    was_training = model.training
    model.eval()
    try:
        with kernels.force_backend("torch"):
            inputs_fp = inputs if fp_trajectory or fp_inputs else None
            for i, block in enumerate(tqdm(blocks, desc=f"{method} blocks", disable=not progress)):
                if streaming and i:
                    load_block(i, block)
                if fp_inputs:
                    inputs = inputs_fp
                y_fp = None
                if inputs_fp is not None:
                    inputs_fp = advance(block, inputs_fp)
                    y_fp = [inp.hidden for inp in inputs_fp]
                if in_block[i]:
                    quantize_block(i, block, in_block[i], inputs, y_fp)
                if not fp_inputs:
                    inputs = advance(block, inputs)
                if release_block is not None:
                    release_block(i, block)
            for fqn in tqdm(list(leftovers), desc=f"{method} other layers", disable=not progress or not leftovers):
                quantize_leftover(fqn, leftovers[fqn], h_left.pop(fqn))
    finally:
        model.train(was_training)
