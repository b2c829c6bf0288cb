"""Integer grids and bit packing: exact round trips, round-to-nearest within half a step."""

import pytest
import torch

from babyllama.quant.pack import check_group_size, dequantize_codes, grid, pack, rtn, storage_bits, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_then_unpack_gives_back_every_code(bits):
    codes = torch.randint(0, 2 ** bits, (7, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 64 * storage_bits(bits) // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_packing_order_is_little_end_first():
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (4, True), (8, True)])
def test_round_to_nearest_errs_by_at_most_half_a_step(bits, sym):
    w = torch.randn(12, 96) * torch.logspace(-3, 1, 12)[:, None]  # rows of very different ranges
    w[5] = 0
    codes, scales, zeros = rtn(w, bits, 32, sym)
    assert int(codes.max()) < 2 ** bits and scales.shape == zeros.shape == (12, 3)
    approx = dequantize_codes(codes.view(-1, 32), scales.reshape(-1), zeros.reshape(-1)).view_as(w)
    step = scales.repeat_interleave(32, dim=1)
    assert ((approx - w).abs() <= step / 2 + 1e-6 * w.abs().amax()).all()
    assert (approx[5] == 0).all()  # a zero row stays exactly zero
    if sym:
        assert (zeros == 2 ** (bits - 1)).all()  # zero in the middle: 0 is on the grid
    else:  # a min-max grid puts both ends on levels: quantized weights quantize to themselves
        again, _, _ = rtn(approx, bits, 32, sym)
        assert torch.equal(again, codes)


def test_grid_covers_the_range():
    w = torch.tensor([[-1.0, 0.5, 3.0]])
    scale, zero = grid(w, 2, sym=False)
    assert torch.allclose(scale, torch.tensor([4.0 / 3])) and zero.item() == 1  # -1 -> code 0 (rounded), 3 -> code 3


def test_group_sizes_that_do_not_divide_are_refused():
    assert check_group_size(128, 0) == 128 and check_group_size(128, 32) == 32
    with pytest.raises(ValueError, match="does not divide the layer width 96"):
        check_group_size(96, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        storage_bits(5)
