"""F, G and D at the reference widths: parameter counts and shapes via jax.eval_shape (no
compute), plus the layers whose PyTorch semantics the reference relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lsd_jax.models import Discriminator, FCN8s, Generator, check_training_size
from lsd_jax.models.layers import (bilinear_kernel, conv_transpose_torch, max_pool_ceil,
                                   max_pool_floor)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_networks(height, width, batch=1):
    """Variables and outputs of F, G, D at the reference widths, as shapes only."""
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    f, g, d = FCN8s(), Generator(), Discriminator()
    key = jax.random.key(0)
    f_vars = jax.eval_shape(lambda x: f.init(key, x, train=False), image)
    f_out = jax.eval_shape(lambda v, x: f.apply(v, x, train=False), f_vars, image)
    g_vars = jax.eval_shape(lambda *a: g.init(key, *a, train=False), *f_out[1:])
    g_out = jax.eval_shape(lambda v, *a: g.apply(v, *a, train=False), g_vars, *f_out[1:])
    d_vars = jax.eval_shape(lambda x: d.init(key, x, train=False), g_out)
    d_out = jax.eval_shape(lambda v, x: d.apply(v, x, train=False), d_vars, g_out)
    return (f_vars, g_vars, d_vars), (f_out, g_out, d_out)


def test_parameter_counts_match_the_reference():
    (f_vars, g_vars, d_vars), _ = abstract_networks(320, 640)
    assert count(f_vars) == 134_456_985
    assert count(f_vars["frozen"]) == 103_968
    assert count(g_vars) == 64_221_187
    assert count(d_vars) == 1_361_047


@pytest.mark.parametrize("size, shapes", [
    ((320, 640), dict(score=(320, 640, 19), fc7=(11, 21, 4096), pool4=(33, 53, 512),
                      pool3=(65, 105, 256), image=(320, 640, 3), heads=(40, 80))),
    ((512, 1024), dict(score=(512, 1024, 19), fc7=(17, 33, 4096), pool4=(45, 77, 512),
                       pool3=(89, 153, 256), image=(512, 1024, 3), heads=(64, 128))),
])
def test_shapes_match_spec(size, shapes):
    _, (f_out, g_out, d_out) = abstract_networks(*size, batch=2)
    score, fc7, pool4, pool3 = f_out
    for name, array in dict(score=score, fc7=fc7, pool4=pool4, pool3=pool3, image=g_out).items():
        assert array.shape == (2, *shapes[name]), name
    out_s, out_c = d_out
    assert out_s.shape == (2, *shapes["heads"], 4)
    assert out_c.shape == (2, *shapes["heads"], 19)


def test_generator_intermediate_sizes_match_spec():
    """G's stages at 320x640: 17x27, 33x53, 65x105, 129x209, 257x417
    (docs/methods.md, section 2)."""
    (_, g_vars, _), (f_out, _, _) = abstract_networks(320, 640)
    _, state = jax.eval_shape(
        lambda v, *a: Generator().apply(v, *a, train=False, capture_intermediates=True,
                                        mutable=["intermediates"]), g_vars, *f_out[1:])
    sizes = [state["intermediates"][f"up{i}"]["__call__"][0].shape[1:3] for i in range(1, 6)]
    assert sizes == [(17, 27), (33, 53), (65, 105), (129, 209), (257, 417)]


@pytest.mark.parametrize("height, width", [(320, 720), (300, 640), (16, 64), (0, 64)])
def test_training_sizes_must_be_multiples_of_32(height, width):
    with pytest.raises(ValueError, match="multiple of 32"):
        check_training_size(height, width)


def test_training_sizes_that_work():
    for height, width in [(32, 32), (320, 640), (512, 1024)]:
        check_training_size(height, width)


@pytest.mark.slow  # compiles F at several sizes
def test_f_alone_evaluates_at_any_size():
    f = FCN8s(num_classes=5, width=1 / 16)
    image = jnp.zeros((1, 75, 131, 3))
    variables = f.init(jax.random.key(0), image, train=False)
    score, *_ = f.apply(variables, image, train=False)
    assert score.shape == (1, 75, 131, 5)


@pytest.mark.parametrize("shape", [(64, 64, 3), (1, 64, 64, 4), (1, 3, 64, 64)])
def test_bad_image_shapes_are_named(shape):
    f = FCN8s(width=1 / 16)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct(shape, jnp.float32))
    with pytest.raises(ValueError, match="D's input"):
        jax.eval_shape(lambda x: Discriminator(width=1 / 16).init(jax.random.key(0), x,
                                                                  train=False),
                       jax.ShapeDtypeStruct(shape, jnp.float32))


def test_frozen_upsamplers_hold_bilinear_kernels():
    f = FCN8s(num_classes=3, width=1 / 16)
    # Compiled (op by op, F's initialisation compiles for seconds).
    variables = jax.jit(f.init, static_argnames="train")(jax.random.key(0),
                                                         jnp.zeros((1, 32, 32, 3)), train=False)
    assert set(variables["frozen"]) == {"upscore2", "upscore_pool4", "upscore8"}
    assert not any(name.startswith("upscore") for name in variables["params"])
    np.testing.assert_array_equal(variables["frozen"]["upscore8"], bilinear_kernel(3, 16))
    # A bilinear kernel upsamples a constant map to the same constant away from the borders.
    up = conv_transpose_torch(jnp.ones((1, 6, 6, 3)), jnp.asarray(bilinear_kernel(3, 4)), 2, 0)
    np.testing.assert_allclose(up[0, 2:-2, 2:-2], 1.0, rtol=1e-6)


@pytest.mark.parametrize("phase_matmul", [False, True])
@pytest.mark.parametrize("k, s, p", [(4, 2, 0), (3, 2, 1), (5, 2, 2), (7, 1, 0), (8, 2, 100),
                                     (16, 8, 0)])
def test_transposed_conv_matches_pytorch(k, s, p, phase_matmul):
    rng = np.random.default_rng(k * 100 + p)
    n = 101 if p == 100 else 7  # PyTorch needs (n - 1) * s + k > 2 * p
    x = rng.standard_normal((2, n, n + 3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 5, k, k)).astype(np.float32)  # PyTorch (in, out, kH, kW)
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w), stride=s, padding=p)
    ours = conv_transpose_torch(jnp.asarray(x), jnp.asarray(w.transpose(2, 3, 0, 1)), s, p,
                                phase_matmul=phase_matmul)
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("size", [(7, 9), (8, 6)])
def test_max_pool_and_its_gradient_match_pytorch_with_ties(ceil_mode, size):
    # Rounded ReLU outputs: many windows hold tied maxima (zeros and positive values). PyTorch
    # gives a window's whole gradient to its first maximum in row-major order; so must we.
    rng = np.random.default_rng(sum(size) + ceil_mode)
    x = np.maximum(np.round(rng.standard_normal((2, *size, 3)) * 2), 0).astype(np.float32)
    pool = max_pool_ceil if ceil_mode else max_pool_floor
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    y_torch = torch.nn.functional.max_pool2d(x_torch, 2, 2, ceil_mode=ceil_mode)
    g = rng.standard_normal(y_torch.shape).astype(np.float32)
    y_torch.backward(torch.from_numpy(g))

    y, vjp = jax.vjp(pool, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))
    even = x[:, :size[0] // 2 * 2, :size[1] // 2 * 2]
    windows = even.reshape(2, size[0] // 2, 2, size[1] // 2, 2, 3).transpose(0, 1, 3, 5, 2, 4)
    windows = windows.reshape(-1, 4)
    top = windows.max(axis=1, keepdims=True)
    assert ((windows == top).sum(axis=1)[top[:, 0] > 0] > 1).any()  # positive ties do occur
    np.testing.assert_array_equal(y, y_torch.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(dx, x_torch.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.slow  # compiles F at several sizes
def test_channel_dropout_drops_whole_feature_maps():
    f = FCN8s(num_classes=3, width=1 / 8)
    image = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)) * 50,
                        jnp.float32)
    variables = f.init(jax.random.key(0), image, train=False)
    _, fc7, _, _ = f.apply(variables, image, train=True, rngs={"dropout": jax.random.key(3)})
    per_map = np.asarray(jnp.abs(fc7).max(axis=(1, 2)))  # (N, C): 0 where a map was dropped
    eval_maps = np.asarray(jnp.abs(f.apply(variables, image, train=False)[1]).max(axis=(1, 2)))
    dropped = (per_map == 0) & (eval_maps > 0)
    assert 0.2 < dropped[eval_maps > 0].mean() < 0.9
