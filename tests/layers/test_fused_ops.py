"""The fused Triton kernels of a layer's element-wise groups against their PyTorch references.

On a CPU the kernels run in Triton's interpreter; on a CUDA machine, compiled. Skipped (with the reason)
where Triton cannot run them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_triton_kernels

from personaplex.layers import fused_ops as fused_ops_module
from personaplex.layers.kv_ring import FP8
from personaplex.layers.rope import rotation_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    require_triton_kernels()
    return fused_ops_module


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)


def tolerance(dtype):
    # One rounding step of the output dtype: float32 summation order may move a value across one.
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 5, 100), (2, 1, 4097)])
def test_rms_norm_equals_the_reference(ops, dtype, shape):
    x = randn(*shape, dtype=dtype, scale=3.0)
    weight = randn(1, 1, shape[-1], seed=1, dtype=dtype)
    got, want = ops.rms_norm(x, weight, 1e-5), ops.rms_norm_reference(x, weight, 1e-5)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 5, 100)])
def test_add_rms_norm_returns_the_exact_sum_and_its_norm(ops, dtype, shape):
    x, delta = randn(*shape, dtype=dtype), randn(*shape, seed=2, dtype=dtype)
    weight = randn(shape[-1], seed=1, dtype=dtype)
    total, normed = ops.add_rms_norm(x, delta, weight, 1e-8)
    ref_total, ref_normed = ops.add_rms_norm_reference(x, delta, weight, 1e-8)
    assert total.dtype == normed.dtype == dtype
    assert torch.equal(total, ref_total)  # the residual stream is rounded exactly as the separate add
    torch.testing.assert_close(normed, ref_normed, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1056), (4, 3, 2 * 33), (2, 2 * 2500)])
def test_silu_mul_equals_the_reference(ops, dtype, shape):
    gate_value = randn(*shape, dtype=dtype, scale=4.0)
    out = ops.silu_mul(gate_value)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, ops.silu_mul_reference(gate_value), **tolerance(dtype))


def qkv_case(batch, steps, heads, head_dim, dtype, seed=0):
    qkv = randn(batch, steps, 3 * heads * head_dim, seed=seed, dtype=dtype, scale=2.0)
    # Vectors of very different sizes, as real keys are (FP8 scales per vector).
    qkv = qkv * torch.logspace(-3, 1, steps, device=DEVICE, dtype=dtype)[None, :, None]
    positions = torch.arange(batch, device=DEVICE)[:, None] * 37 + torch.arange(steps, device=DEVICE)
    return qkv, rotation_for(positions, head_dim, 10_000.0).cos_sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, steps, heads, head_dim", [(1, 1, 4, 64), (3, 1, 2, 48), (2, 7, 3, 10)])
def test_qkv_heads_rotates_and_lays_out_like_the_reference(ops, dtype, batch, steps, heads, head_dim):
    qkv, cos_sin = qkv_case(batch, steps, heads, head_dim, dtype)
    got = ops.qkv_heads(qkv, heads, cos_sin, None)
    want = ops.qkv_heads_reference(qkv, heads, cos_sin, None)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape == (batch, heads, steps, head_dim) and a.dtype == dtype, name
        torch.testing.assert_close(a, b, **tolerance(dtype))
    assert torch.equal(got[2], want[2])  # v is only moved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, steps, heads, head_dim", [(1, 1, 4, 64), (3, 1, 2, 48), (2, 5, 3, 10)])
def test_qkv_heads_quantises_k_and_v_like_quantize_fp8(ops, dtype, batch, steps, heads, head_dim):
    qkv, cos_sin = qkv_case(batch, steps, heads, head_dim, dtype, seed=3)
    q, k8, k_scale, v8, v_scale = ops.qkv_heads(qkv, heads, cos_sin, dtype)
    ref_q, ref_k8, ref_k_scale, ref_v8, ref_v_scale = ops.qkv_heads_reference(qkv, heads, cos_sin, dtype)
    assert k8.dtype == v8.dtype == FP8 and k_scale.dtype == v_scale.dtype == dtype
    assert k_scale.shape == (batch, heads, steps, 1)
    torch.testing.assert_close(q, ref_q, **tolerance(dtype))
    # v is quantised from the same values: same scales and bytes.
    assert torch.equal(v_scale, ref_v_scale)
    assert torch.equal(v8.view(torch.uint8), ref_v8.view(torch.uint8))
    # k is rotated first (float32 summation order may differ in the last bit): bytes equal but for rare ties.
    torch.testing.assert_close(k_scale, ref_k_scale, **tolerance(dtype))
    differ = (k8.view(torch.uint8) != ref_k8.view(torch.uint8)).float().mean().item()
    assert differ <= 0.01, differ
    torch.testing.assert_close(k8.float() * k_scale.float(), ref_k8.float() * ref_k_scale.float(),
                               atol=1e-6, rtol=0.07)  # within one e4m3 step


def test_fp8_rounding_matches_torch_on_every_boundary(ops):
    """Values at, between and around every e4m3 value (ties included), subnormals and signed zeros: the
    kernel's bytes equal torch's cast of the same division (v of ``qkv_heads``, rotation-free)."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid * (1 + 2 ** -12), grid * (1 - 2 ** -12)])
    points = points[points.abs() <= 448.0]
    points = torch.cat([points, -points, torch.tensor([0.0, -0.0, 1e-9, -1e-9])])
    heads, head_dim = 1, 2 * (points.numel() // 2)
    values = points[:head_dim]
    values[0] = 448.0  # the vector's largest magnitude: scale 1, so the kernel quantises the values as given
    qkv = torch.zeros(1, 1, 3 * head_dim)
    qkv[..., 2 * head_dim:] = values
    cos_sin = rotation_for(torch.zeros(1, 1, dtype=torch.long), head_dim, 10_000.0).cos_sin
    *_, v8, v_scale = ops.qkv_heads(qkv.to(DEVICE), heads, cos_sin.to(DEVICE), torch.float32)
    *_, ref_v8, ref_v_scale = ops.qkv_heads_reference(qkv.to(DEVICE), heads, cos_sin.to(DEVICE), torch.float32)
    assert v_scale.item() == ref_v_scale.item() == 1.0
    got, want = v8.view(torch.uint8).cpu().flatten(), ref_v8.view(torch.uint8).cpu().flatten()
    differ = (got != want).nonzero().flatten()[:8]
    assert differ.numel() == 0, [(values[i].item(), v8.flatten()[i].item(), ref_v8.flatten()[i].item()) for i in differ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entries, head_dim", [(16, 64), (5, 24)])
def test_depth_attention_stores_and_attends_like_the_reference(ops, dtype, entries, head_dim):
    batch, heads = 3, 2
    first = torch.zeros(batch, heads, entries, head_dim, dtype=dtype, device=DEVICE)
    caches = {name: (randn(*first.shape, seed=4, dtype=dtype), randn(*first.shape, seed=5, dtype=dtype))
              for name in ("kernel", "reference")}
    caches["reference"] = tuple(c.clone() for c in caches["kernel"])
    for step in range(entries):
        first_visible = max(0, step - entries + 2)  # the depth transformer's rule: the last step skips the first
        qkv = randn(batch, 1, 3 * heads * head_dim, seed=10 + step, dtype=dtype)
        got = ops.depth_attention(qkv, *caches["kernel"], step, first_visible, heads)
        want = ops.depth_attention_reference(qkv, *caches["reference"], step, first_visible, heads)
        assert got.shape == (batch, 1, heads * head_dim) and got.dtype == dtype
        torch.testing.assert_close(got, want, **tolerance(dtype))
        for mine, theirs in zip(caches["kernel"], caches["reference"]):
            assert torch.equal(mine, theirs)  # the stored entry, and nothing else written


def test_depth_attention_reads_a_view_of_a_layer_of_the_cache(ops):
    """The depth transformer passes ``keys[layer]`` of a [layers, B, H, S, D] cache: strided slots."""
    keys, values = randn(2, 3, 2, 4, 16, seed=1), randn(2, 3, 2, 4, 16, seed=2)
    ref_keys, ref_values = keys.clone(), values.clone()
    qkv = randn(3, 1, 3 * 2 * 16, seed=3)
    got = ops.depth_attention(qkv, keys[1], values[1], 2, 0, 2)
    want = ops.depth_attention_reference(qkv, ref_keys[1], ref_values[1], 2, 0, 2)
    torch.testing.assert_close(got, want)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def test_strided_inputs_are_read_as_their_values(ops):
    x = randn(6, 4).t()  # [4, 6], rows not contiguous
    weight = randn(6, seed=1)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), ops.rms_norm_reference(x, weight, 1e-5))
    gate_value = randn(8, 3).t()
    torch.testing.assert_close(ops.silu_mul(gate_value), ops.silu_mul_reference(gate_value))


def test_bad_arguments_are_refused(ops):
    with pytest.raises(ValueError, match="shape"):
        ops.add_rms_norm(randn(2, 4), randn(1, 4), randn(4), 1e-5)
    with pytest.raises(ValueError, match="step"):
        ops.depth_attention(randn(1, 1, 12), randn(1, 1, 4, 4), randn(1, 1, 4, 4), 4, 0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_sum_equals_the_models_embed(ops, dtype):
    """The LM's input embedding (17 lookups, -1 tokens left out, ids clamped into their tables) in one kernel."""
    import dataclasses

    from personaplex.config import TINY_LM
    from personaplex.lm.model import LMModel
    from personaplex.random_weights import randomize_

    config = dataclasses.replace(TINY_LM, dim=40)  # not a multiple of the kernel's block
    lm = randomize_(LMModel(config), seed=1).to(DEVICE, dtype)
    embed = ops.EmbeddingSum([table.weight for table in lm.emb] + [lm.text_emb.weight],
                             [1 + codebook for codebook in range(config.n_q)] + [0])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(-1, config.card + 1, (3, 4, 1 + config.n_q), generator=generator)
    tokens[0, 0, 0] = config.text_card + 5  # out of the text table: clamped
    tokens[1, 2, 3] = 10**6
    tokens[2, 1] = -1  # a frame with every channel left out
    tokens = tokens.to(DEVICE)
    got, want = embed(tokens), lm.embed(tokens)
    assert got.dtype == dtype and got.shape == want.shape == (3, 4, config.dim)
    assert torch.equal(got, want)  # the same lookups added in the same order, each sum rounded alike


def test_scaled_add_equals_the_reference(ops):
    x, scale, y = randn(2, 3, 64), randn(64, seed=1), randn(2, 3, 64, seed=2)
    got = ops.TRITON_OPS.scaled_add(x, scale, y)
    torch.testing.assert_close(got, ops.EAGER_OPS.scaled_add(x, scale, y), **tolerance(torch.float32))


def test_mimi_transformer_streams_alike_with_the_triton_ops(ops):
    """Mimi's streaming transformer with its RoPE and head layout in the Triton kernel (the engine's "triton"
    codec kind) gives the eager outputs and leaves the same KV rings, call after call past a full ring."""
    import dataclasses

    from personaplex.codec.transformer import TransformerStack, stream_function
    from personaplex.config import SMALL_MIMI

    config = dataclasses.replace(SMALL_MIMI.transformer, context=8)  # a short ring: few calls wrap it
    torch.manual_seed(0)
    stack = TransformerStack(config).to(DEVICE).eval()
    for layer in stack.layers:  # a visible residual branch (the default LayerScale is 0.01)
        torch.nn.init.normal_(layer.layer_scale_1.scale, std=0.5)
        torch.nn.init.normal_(layer.layer_scale_2.scale, std=0.5)
    states = {kind: stack.new_state(2, DEVICE) for kind in ("eager", "triton")}
    functions = {kind: stream_function(stack, kind) for kind in states}
    calls = config.context // 2 + 3  # the ring wraps
    with torch.no_grad():
        for call in range(calls):
            x = randn(2, 2, config.d_model, seed=100 + call)
            out = {kind: functions[kind](x, states[kind]) for kind in states}
            torch.testing.assert_close(out["triton"], out["eager"], atol=1e-4, rtol=1e-4)
    for got, want in zip(states["triton"].tensors(), states["eager"].tensors()):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
