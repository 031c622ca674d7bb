"""Hybrid sparse attention masks: the patterns, FlexAttention against the same mask applied densely, block counts."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import sparsetrain.nn.attention_masks as am
from sparsetrain.errors import UserError


def test_patterns_by_hand():
    T = 7
    expected_local = [[int(0 <= q - k < 3) for k in range(T)] for q in range(T)]  # window 3: itself and 2 back
    expected_strided = [[int(q >= k and (q - k) % 3 == 0) for k in range(T)] for q in range(T)]
    local = am.dense_mask("local", T, window=3, stride=3).int().tolist()
    strided = am.dense_mask("strided", T, window=3, stride=3).int().tolist()
    assert local == expected_local and strided == expected_strided
    assert local[6] == [0, 0, 0, 0, 1, 1, 1] and strided[6] == [1, 0, 0, 1, 0, 0, 1]
    hybrid = am.dense_mask("hybrid", T, window=2, stride=4)
    assert hybrid[6].int().tolist() == [0, 0, 1, 0, 0, 1, 1]
    assert torch.equal(hybrid, am.dense_mask("local", T, 2, 4) | am.dense_mask("strided", T, 2, 4))
    # Every pattern is causal and keeps the diagonal (no row is empty).
    for kind in am.KINDS:
        m = am.dense_mask(kind, 50, window=5, stride=7)
        assert not m.triu(1).any() and m.diagonal().all()


def _qkv(T, heads=4, kv_heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, T, d, generator=g)
    k = torch.randn(2, kv_heads, T, d, generator=g)
    v = torch.randn(2, kv_heads, T, d, generator=g)
    return q, k, v


CASES = [("local", 300, 40, 128), ("strided", 300, 40, 17), ("hybrid", 300, 40, 256)]


@pytest.mark.parametrize("kind, T, window, stride", CASES)
def test_flex_attention_forward_equals_dense_masked_sdpa(kind, T, window, stride):
    q, k, v = _qkv(T)
    block_mask = am.build_block_mask(kind, T, window, stride, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=am.dense_mask(kind, T, window, stride), enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_flex_attention_skips_exactly_the_empty_blocks():
    """The compiled kernel visits only the BlockMask's blocks: equal output means no needed block is missing."""
    T, window = 512, 64
    q, k, v = _qkv(T, heads=2, kv_heads=2)
    block_mask = am.build_block_mask("local", T, window, 1, "cpu")
    out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=am.dense_mask("local", T, window, 1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
@pytest.mark.parametrize("kind, T, window, stride", CASES)
def test_flex_attention_gradients_equal_dense_masked_sdpa(kind, T, window, stride):
    grads = []
    for flex in (True, False):
        q, k, v = (t.cuda().requires_grad_() for t in _qkv(T))
        if flex:
            block_mask = am.build_block_mask(kind, T, window, stride, "cuda")
            out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)
        else:
            mask = am.dense_mask(kind, T, window, stride, device="cuda")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.square().sum().backward()
        grads.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind, T, window, stride", CASES + [("local", 1024, 128, 1), ("strided", 1024, 1, 128)])
def test_block_mask_structure_and_block_counts(kind, T, window, stride):
    block_mask = am.build_block_mask(kind, T, window, stride, "cpu")
    dense = am.dense_mask(kind, T, window, stride)
    n = -(-T // am.BLOCK)
    padded = torch.zeros(n * am.BLOCK, n * am.BLOCK, dtype=torch.bool)
    padded[:T, :T] = dense
    blocks = padded.view(n, am.BLOCK, n, am.BLOCK)
    any_allowed = blocks.any(dim=3).any(dim=1)
    # The blocks FlexAttention visits (partial and full) are exactly those with an allowed score.
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_allowed)
    # Blocks marked full (mask not evaluated) are entirely allowed.
    full = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        cols = block_mask.full_kv_indices[0, 0, row, : block_mask.full_kv_num_blocks[0, 0, row]]
        full[row, cols.long()] = True
    assert not (full & ~blocks.all(dim=3).all(dim=1)).any()
    # The analytic count used for FLOPs equals the BlockMask's.
    counted = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
    assert am.computed_blocks(kind, T, window, stride) == counted == int(any_allowed.sum())


def test_block_fractions_are_honest():
    T = 4096
    causal = am.computed_blocks("causal", T, 1, 1)
    assert causal == 32 * 33 // 2
    # A band of one block computes the diagonal and the block below it.
    assert am.computed_blocks("local", T, 128, 1) == 32 + 31
    assert am.block_fraction("local", T, 128, 1) == pytest.approx(63 / 528)
    # A stride below 2 blocks hits every causal block: no saving at all (the authors' stride is 128).
    assert am.block_fraction("strided", T, 1, 128) == 1.0 and am.block_fraction("hybrid", T, 128, 255) == 1.0
    assert am.block_fraction("strided", T, 1, 256) < 1.0


def test_block_masks_are_cached_and_bad_patterns_refused():
    a = am.build_block_mask("hybrid", 256, 32, 64, "cpu")
    assert am.build_block_mask("hybrid", 256, 32, 64, torch.device("cpu")) is a
    assert am.build_block_mask("hybrid", 256, 32, 65, "cpu") is not a
    with pytest.raises(UserError, match=r"method.window=300 must be in \[1, train.seq_len=256\]"):
        am.check("local", 256, 300, 1)
    with pytest.raises(UserError, match="method.stride=0"):
        am.check("hybrid", 256, 8, 0)
    with pytest.raises(UserError, match="unknown method.attention 'dilated'"):
        am.check("dilated", 256, 8, 8)
    am.check("local", 256, 256, 0)  # the stride does not matter to a band
