"""Sequence-packing helpers: round trips, positions, labels, the dense mask, and bad input."""

import pytest
import torch

from unigen.model.packing import (
    PackedBatch,
    next_token_labels,
    pack,
    packed_to_padded,
    padded_to_packed,
    prefix_lm_dense_mask,
    unpack,
)


def _seqs(lengths, *trailing, dtype=torch.float32):
    return [torch.randn(n, *trailing).to(dtype) for n in lengths]


def test_pack_fields():
    seqs = _seqs([3, 1, 5], 4)
    b = pack(seqs, [2, 0, 5])
    assert isinstance(b, PackedBatch)
    assert b.values.shape == (9, 4)
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 9]
    assert b.prefix_lens.dtype == torch.int32 and b.prefix_lens.tolist() == [2, 0, 5]
    assert b.position_ids.dtype == torch.int64
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert b.max_seqlen == 5 and isinstance(b.max_seqlen, int)
    assert b.batch_size == 3 and b.total_tokens == 9
    torch.testing.assert_close(b.values, torch.cat(seqs))


@pytest.mark.parametrize("trailing", [(), (3,), (2, 4)])
def test_pack_unpack_round_trip(trailing):
    lengths = [4, 1, 7, 2]
    seqs = _seqs(lengths, *trailing)
    b = pack(seqs, torch.tensor([1, 1, 0, 2]))
    back = unpack(b.values, b.cu_seqlens)
    assert len(back) == len(seqs)
    for a, s in zip(back, seqs):
        assert torch.equal(a, s)


def test_packed_padded_round_trip_and_gradient():
    lengths = [4, 1, 6]
    b = pack(_seqs(lengths, 3), [0, 0, 0])
    values = b.values.clone().requires_grad_()
    padded, mask = packed_to_padded(values, b.cu_seqlens, b.max_seqlen, pad_value=-7.0)
    assert padded.shape == (3, 6, 3) and mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    assert (padded[~mask] == -7.0).all()
    for i, n in enumerate(lengths):
        start = int(b.cu_seqlens[i])
        assert torch.equal(padded[i, :n], values[start:start + n])
    back = padded_to_packed(padded, lengths)
    assert torch.equal(back, values)
    assert torch.equal(padded_to_packed(padded, mask.sum(1)), values)
    # the gather is differentiable and the pads receive nothing
    (padded * torch.arange(18.0).reshape(3, 6, 1)).sum().backward()
    pos = b.position_ids.float() + torch.tensor([0] * 4 + [6] + [12] * 6)
    torch.testing.assert_close(values.grad, pos[:, None].expand(-1, 3))


def test_packed_to_padded_longer_than_needed():
    b = pack(_seqs([2, 3]), [0, 0])
    padded, mask = packed_to_padded(b.values, b.cu_seqlens, 5)
    assert padded.shape == (2, 5) and mask.sum().item() == 5
    assert (padded[~mask] == 0).all()


def test_next_token_labels():
    token_ids = torch.tensor([10, 11, 12, 13, 14, 20, 21, 22, 30, 40, 41])
    cu = torch.tensor([0, 5, 8, 9, 11], dtype=torch.int32)
    prefix = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    labels = next_token_labels(token_ids, cu, prefix)
    # sample 0 (prefix 2): the first target is token 12, predicted at position 1
    # sample 1 (no prefix): plain shift; sample 2 (1 token): nothing; sample 3 all prefix
    assert labels.tolist() == [-100, 12, 13, 14, -100, 21, 22, -100, -100, -100, -100]
    assert labels.dtype == torch.int64
    assert next_token_labels(token_ids, cu, prefix, ignore_index=-1).tolist()[0] == -1


def test_next_token_labels_matches_per_sample_shift():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 9, (6,), generator=g).tolist()
    prefixes = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in lengths]
    seqs = [torch.randint(0, 100, (n,), generator=g) for n in lengths]
    b = pack(seqs, prefixes)
    expected = []
    for s, p in zip(seqs, prefixes):
        for t in range(len(s)):
            expected.append(int(s[t + 1]) if t + 1 < len(s) and t + 1 >= p else -100)
    assert next_token_labels(b.values, b.cu_seqlens, b.prefix_lens).tolist() == expected


def test_dense_mask():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    prefix = torch.tensor([2, 0], dtype=torch.int32)
    mask = prefix_lm_dense_mask(cu, prefix, 5)
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------------------------------
# bad input


def test_pack_errors():
    with pytest.raises(ValueError, match=r"prefix_lens\[1\] = 4 must lie in \[0, length of seqs\[1\] = 3\]"):
        pack(_seqs([2, 3]), [1, 4])
    with pytest.raises(ValueError, match="prefix_lens has 1 entries for 2 sequences"):
        pack(_seqs([2, 3]), [1])
    with pytest.raises(ValueError, match="seqs is empty"):
        pack([], [])
    with pytest.raises(ValueError, match=r"seqs\[1\] has trailing shape"):
        pack([torch.randn(2, 3), torch.randn(2, 4)], [0, 0])
    with pytest.raises(TypeError, match=r"seqs\[1\] has dtype"):
        pack([torch.randn(2), torch.randn(2).double()], [0, 0])
    with pytest.raises(TypeError, match="seqs must be a list or tuple"):
        pack(torch.randn(2, 3), [0, 0])
    with pytest.raises(TypeError, match="prefix_lens must hold integers"):
        pack(_seqs([2, 3]), [0.5, 1])


@pytest.mark.parametrize("cu,match", [
    ([1, 3, 5], r"cu_seqlens\[0\] must be 0"),
    ([0, 3, 4], r"cu_seqlens\[-1\] must equal total_tokens = 5"),
    ([0, 4, 2, 5], "cu_seqlens must be non-decreasing"),
])
def test_bad_cu_seqlens(cu, match):
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        unpack(torch.randn(5), cu)
    with pytest.raises(ValueError, match=match):
        packed_to_padded(torch.randn(5), cu, 5)
    with pytest.raises(ValueError, match=match):
        next_token_labels(torch.arange(5), cu, torch.zeros(cu.numel() - 1, dtype=torch.int32))


def test_other_errors():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen = 2 is smaller than the length of sample 1"):
        packed_to_padded(torch.randn(5), cu, 2)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        packed_to_padded(torch.randn(5), cu.float(), 3)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 4 must lie in \[0, padded.shape\[1\] = 3\]"):
        padded_to_packed(torch.randn(2, 3), [1, 4])
    with pytest.raises(ValueError, match="lengths has 1 entries"):
        padded_to_packed(torch.randn(2, 3), [1])
    with pytest.raises(ValueError, match=r"prefix_lens\[0\] = 3 must lie in \[0, length of sample 0 = 2\]"):
        next_token_labels(torch.arange(5), cu, torch.tensor([3, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="token_ids must be a packed 1-D integer tensor"):
        next_token_labels(torch.randn(5), cu, torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="prefix_lens must have one value per sample"):
        prefix_lm_dense_mask(cu, torch.tensor([0], dtype=torch.int32), 5)
    with pytest.raises(TypeError, match="total_tokens must be a non-negative Python int"):
        prefix_lm_dense_mask(cu, torch.tensor([0, 0], dtype=torch.int32), 5.0)
