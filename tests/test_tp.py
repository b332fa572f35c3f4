"""Tensor-parallel shards (pyquant.tp), without vLLM: for tp in {2, 4}, every rank's tensors cut
from a checkpoint by the loaders, its layer's outputs gathered as vLLM gathers them (concatenated
for column-parallel, summed for row-parallel), equal the unsharded layer's."""
import pytest
import torch
from torch import nn

import pyquant
from pyquant import tp
from pyquant.io import layer_entry

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 256, 8, 2, 32, 512
TENSORS = ("codes", "A", "b", "su", "sv", "w_scale")


def quantized(n_in: int, n_out: int, seed: int, bias: bool = False, block: int = 32, **kw) -> pyquant.QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    return pyquant.QuantLinear.from_linear(lin, pyquant.RTNConfig(hadamard_block=block, seed=seed, **kw))


def load_all(shard: tp.Shard, layers: list[pyquant.QuantLinear], shard_ids: list) -> dict[str, torch.Tensor]:
    tensors = shard.empty()
    for layer, sid in zip(layers, shard_ids):
        for name in TENSORS:
            shard.load(tensors, name, getattr(layer, name), sid)
    return tensors


def qkv_rows(tp_size: int, rank: int) -> tuple[list[int], list[int]]:
    """vLLM's QKVParallelLinear arithmetic: q heads split; kv heads split, or replicated when
    there are fewer of them than ranks."""
    q_heads = HEADS // tp_size
    if tp_size >= KV_HEADS:
        kv_heads, replicas = 1, tp_size // KV_HEADS
    else:
        kv_heads, replicas = KV_HEADS // tp_size, 1
    rows = [q_heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM]
    return rows, [rank, rank // replicas, rank // replicas]


@pytest.mark.parametrize("tp_size", [2, 4])
def test_qkv_column_parallel_gathers_to_the_unsharded_layers(tp_size, cpu_mode):
    cpu_mode("int")  # the same bits as the unsharded layers: int mode (the default is lut on AVX2 CPUs)
    q, k, v = (quantized(HIDDEN, n, seed=i, bias=True) for i, n in
               enumerate((HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)))
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        ref = [m(x) for m in (q, k, v)]
    entries = [layer_entry(m) for m in (q, k, v)]
    for rank in range(tp_size):
        rows, slots = qkv_rows(tp_size, rank)
        shard = tp.Shard.column("qkv_proj", entries, rows, slots)
        tensors = load_all(shard, [q, k, v], ["q", "k", "v"])
        bias = torch.cat([m.bias[s * n:(s + 1) * n] for m, n, s in zip((q, k, v), rows, slots)]).detach()
        with torch.no_grad():
            y = tp.forward(shard.layers(tensors), x, bias)
        want = torch.cat([r[:, s * n:(s + 1) * n] for r, n, s in zip(ref, rows, slots)], dim=-1)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_gate_up_column_parallel_gathers_to_the_unsharded_layers(tp_size, cpu_mode):
    cpu_mode("int")  # the same bits as the unsharded layers: int mode (the default is lut on AVX2 CPUs)
    gate, up = quantized(HIDDEN, MLP, seed=10), quantized(HIDDEN, MLP, seed=11, scale_dtype=torch.float16)
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        ref = torch.cat([gate(x), up(x)], dim=-1)
    n = MLP // tp_size
    outs = []
    for rank in range(tp_size):
        shard = tp.Shard.column("gate_up_proj", [layer_entry(gate), layer_entry(up)], [n, n], [rank, rank])
        tensors = load_all(shard, [gate, up], [0, 1])
        with torch.no_grad():
            outs.append(tp.forward(shard.layers(tensors), x))
    # vLLM's all-gather: each rank's [gate_r, up_r]
    gathered = torch.cat([torch.cat([o[:, :n] for o in outs], -1), torch.cat([o[:, n:] for o in outs], -1)], -1)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_parallel_partial_sums_add_up_to_the_unsharded_layer(tp_size, dtype):
    down = quantized(MLP, HIDDEN, seed=20, bias=True)
    x = torch.randn(4, MLP).to(dtype)
    with torch.no_grad():
        ref = down(x).float()
        total = torch.zeros_like(ref)
        for rank in range(tp_size):
            shard = tp.Shard.row("down_proj", layer_entry(down), rank, tp_size)
            assert (shard.in_features, shard.col_start) == (MLP // tp_size, rank * MLP // tp_size)
            tensors = load_all(shard, [down], [None])
            x_r = x[:, rank * shard.in_features:(rank + 1) * shard.in_features]
            # vLLM adds the bias on rank 0 only
            total += tp.forward(shard.layers(tensors), x_r, down.bias.detach() if rank == 0 else None).float()
    # the CPU kernel rounds each row of its input to 16-bit fixed point on the row's own range: a
    # rank's slice has its own range, so the sums agree to the kernel tolerance (DESIGN.md: 1e-3)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(total, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_the_shards_share_the_loaded_tensors_and_verify_the_checksum_when_whole():
    q = quantized(HIDDEN, HIDDEN, seed=1, bias=True)
    entry = layer_entry(q)
    shard = tp.Shard.column("q", [entry], [HIDDEN], [0])
    tensors = load_all(shard, [q], [None])
    layers = shard.layers(tensors, q.bias.detach(), format_version=2)
    assert layers[0].codes.data_ptr() == tensors["codes"].data_ptr()  # a view, not a copy
    tensors["codes"][0, 0] ^= 1  # one flipped bit
    with pytest.raises(ValueError, match="checksum"):
        shard.layers(tensors, q.bias.detach(), format_version=2)


def test_cuts_that_split_a_hadamard_block_are_refused_naming_the_layer():
    down = quantized(MLP, HIDDEN, seed=2, block=128)  # had_in = 128
    with pytest.raises(ValueError, match=r"down_proj.*had_in must divide the in_features / tp = 64 columns"):
        tp.Shard.row("down_proj", layer_entry(down), 0, 8)
    k = quantized(HIDDEN, KV_HEADS * HEAD_DIM, seed=3, block=64)  # had_out = 64 rows, 32 per rank at tp 2
    with pytest.raises(ValueError, match=r"qkv_proj.*had_out must divide"):
        tp.Shard.column("qkv_proj", [layer_entry(k)], [HEAD_DIM], [0])
    with pytest.raises(ValueError, match="does not split into 3"):
        tp.Shard.row("o_proj", layer_entry(down), 0, 3)


def test_bad_checkpoint_tensors_and_entries_are_refused():
    q, k = quantized(HIDDEN, HIDDEN, seed=4), quantized(HIDDEN, HIDDEN, seed=5, scale_dtype=torch.float32)
    shard = tp.Shard.column("qkv_proj", [layer_entry(q)], [HIDDEN], [0])
    tensors = shard.empty()
    with pytest.raises(ValueError, match=r"qkv_proj.codes .*expected torch.uint8 \(256, 64\)"):
        shard.load(tensors, "codes", q.codes[:, :10], None)
    with pytest.raises(ValueError, match="unexpected checkpoint tensor 'weight'"):
        shard.load(tensors, "weight", q.codes, None)
    with pytest.raises(ValueError, match="unknown shard id 'v'"):
        shard.load(tensors, "codes", q.codes, "v")
    with pytest.raises(ValueError, match="different dtypes"):
        tp.Shard.column("qkv_proj", [layer_entry(q), layer_entry(k)], [HIDDEN, HIDDEN], [0, 0])
    bad = {**layer_entry(q), "su_dtype": "int2"}
    with pytest.raises(ValueError, match="qkv_proj: its quantization_config entry is invalid: su_dtype"):
        tp.Shard.column("qkv_proj", [bad], [HIDDEN], [0])
    with pytest.raises(ValueError, match="packed layers only"):
        tp.Shard.column("qkv_proj", [{**layer_entry(q), "kind": "dequant"}], [HIDDEN], [0])
