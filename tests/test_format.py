import pytest
import torch

import pyquant
from pyquant import format as fmt
from pyquant.hadamard import blockwise_hadamard, default_block, hadamard_matrix

from conftest import random_packed, rel_err


def test_pack_unpack_all_256_codes_exact():
    codes = torch.arange(256, dtype=torch.uint8).reshape(64, 4)
    z = fmt.unpack_codes(codes)
    assert z.shape == (64, 16) and int(z.max()) == 3
    assert torch.equal(fmt.pack_codes(z), codes)
    # code = 64*z0 + 16*z1 + 4*z2 + z3, identical to INT2 packing z0<<6 | z1<<4 | z2<<2 | z3
    zz = z.reshape(-1, 4).long()
    assert torch.equal(zz @ torch.tensor([64, 16, 4, 1]), torch.arange(256))


def test_cpp_extension_pack_matches_python():
    from pyquant import _C

    z = torch.randint(0, 4, (37, 96), dtype=torch.uint8)
    assert torch.equal(_C.pack_codes(z), fmt.pack_codes(z))
    assert torch.equal(_C.unpack_codes(fmt.pack_codes(z)), z)
    with pytest.raises(ValueError, match="0..3"):
        _C.pack_codes(torch.full((2, 4), 4, dtype=torch.uint8))


def test_pack_rejects_bad_levels():
    with pytest.raises(ValueError, match="0..3"):
        fmt.pack_codes(torch.full((2, 4), 4))
    with pytest.raises(ValueError, match="K % 4"):
        fmt.pack_codes(torch.zeros(2, 6, dtype=torch.uint8))
    with pytest.raises(TypeError):
        fmt.pack_codes(torch.zeros(2, 4))


def test_codebook_uniform_grid():
    cb = fmt.codebook(torch.eye(4), torch.full((4,), -1.5))
    assert cb.shape == (256, 4)
    assert set(cb.unique().tolist()) == {-1.5, -0.5, 0.5, 1.5}
    assert torch.equal(cb[0b00011011], torch.tensor([-1.5, -0.5, 0.5, 1.5]))


@pytest.mark.parametrize("k", [384, 1536, 11008, 4096, 12])
def test_hadamard_blockwise_is_orthogonal_and_self_inverse(k):
    block = default_block(k)
    assert block and k % block == 0 and block & (block - 1) == 0
    x = torch.randn(3, k, dtype=torch.float64)
    y = blockwise_hadamard(x, block)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    assert torch.allclose(blockwise_hadamard(y, block), x)
    # equals multiplication by the block-diagonal matrix
    dense = torch.block_diag(*[hadamard_matrix(block, torch.float64)] * (k // block))
    assert torch.allclose(y, x @ dense)


def test_default_block_values():
    assert [default_block(d) for d in (384, 1536, 11008, 4096, 1537)] == [128, 128, 128, 128, 0]
    assert [default_block(d, cap=4096) for d in (384, 1536, 11008)] == [128, 512, 256]
    with pytest.raises(ValueError):
        blockwise_hadamard(torch.randn(2, 12), 8)


def test_bits_per_weight_4096():
    pw = random_packed(4096, 4096, scale_dtype=torch.float16)
    bpw = fmt.bits_per_weight(pw)
    assert 2.0 < bpw < 2.02
    layer = pyquant.QuantLinear.from_packed(pw)
    assert pyquant.bits_per_weight(layer) == pytest.approx(bpw)


def test_transform_activations_reproduces_matmul():
    pw = random_packed(33, 384)
    x = torch.randn(5, 384)
    xt, const = fmt.transform_activations(x, pw)
    z = fmt.unpack_codes(pw.codes).float()
    y_rot = pw.w_scale * (xt @ z.T + const[:, None])
    y = fmt.finish_output(y_rot, pw, None)
    assert rel_err(y, x.double() @ fmt.dequantize(pw).double().T) < 1e-5


def test_validate_names_the_bad_field():
    pw = random_packed(8, 16)
    pw.su = torch.ones(15)
    with pytest.raises(ValueError, match="su"):
        pw.validate()
    pw = random_packed(8, 16)
    pw.A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="A"):
        pw.validate()
    pw = random_packed(8, 16)
    pw.had_in = 3
    with pytest.raises(ValueError, match="had_in"):
        pw.validate()
