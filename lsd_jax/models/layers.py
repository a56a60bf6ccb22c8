"""Layers shared by F, G and D, with PyTorch's semantics where the reference relies on them."""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# G and D: conv and transposed-conv kernels N(0, 0.02), biases U(-0.01, 0.01)
# (docs/methods.md, section 2).
gan_kernel_init = nn.initializers.normal(stddev=0.02)


def gan_bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-0.01, maxval=0.01)


def at_least_float32(x: jax.Array) -> jax.Array:
    """x in float32, or in its own dtype when that is wider (float64 reference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm2d without scale or shift: per sample and channel over H and W.

    Statistics are taken in float32 whatever the compute dtype, as PyTorch's autocast does.
    """
    x32 = at_least_float32(x)
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _window_corners(x: jax.Array):
    """The four members of every 2x2/2 window of an even-sized NHWC map, in row-major order."""
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


def _first_max_corner(corners):
    """(maximum, index 0-3 of the first corner that attains it, in row-major order)."""
    top_left, top_right, bottom_left, bottom_right = corners
    top, top_index = jnp.maximum(top_left, top_right), jnp.where(top_right > top_left, 1, 0)
    bottom = jnp.maximum(bottom_left, bottom_right)
    bottom_index = jnp.where(bottom_right > bottom_left, 3, 2)
    index = jnp.where(bottom > top, bottom_index, top_index).astype(jnp.int8)
    return jnp.maximum(top, bottom), index


@jax.custom_vjp
def _max_pool_2x2_even(x: jax.Array) -> jax.Array:
    return _first_max_corner(_window_corners(x))[0]


def _max_pool_2x2_even_fwd(x):
    return _first_max_corner(_window_corners(x))  # (output, residual: the winners' indices)


def _max_pool_2x2_even_bwd(index, g):
    # The whole gradient of a window goes to its first maximum in row-major order, as in
    # PyTorch and XLA's select-and-scatter. The winner's index is saved by the forward rule:
    # comparing the saved output with the input again would need both to be bitwise equal, and
    # under jit XLA may recompute the input in the backward fusion with another rounding, which
    # silently dropped the gradient of whole windows. Written as elementwise selects and an
    # interleave because XLA's CPU select-and-scatter is 3-10x slower.
    zero = jnp.zeros((), g.dtype)
    grads = [jnp.where(index == corner, g, zero) for corner in range(4)]
    top = jnp.stack(grads[:2], axis=3)      # (n, h/2, w/2, 2, c)
    bottom = jnp.stack(grads[2:], axis=3)
    n, h, w, c = g.shape
    return (jnp.stack([top, bottom], axis=2).reshape(n, 2 * h, 2 * w, c),)


_max_pool_2x2_even.defvjp(_max_pool_2x2_even_fwd, _max_pool_2x2_even_bwd)


def max_pool_2x2_reduce_window(x: jax.Array, ceil_mode: bool) -> jax.Array:
    """The plain form of both pools (XLA's reduce_window; select-and-scatter gradient)."""
    h, w = x.shape[1:3]
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0)) if ceil_mode else "VALID"
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), pad)


def max_pool_ceil(x: jax.Array, plain: bool = False) -> jax.Array:
    """2x2/2 max-pool in PyTorch's ceil mode: a partial window at the bottom/right is kept."""
    if plain:
        return max_pool_2x2_reduce_window(x, ceil_mode=True)
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return _max_pool_2x2_even(x)


def max_pool_floor(x: jax.Array, plain: bool = False) -> jax.Array:
    """2x2/2 max-pool in floor mode (a trailing odd row/column is dropped)."""
    if plain:
        return max_pool_2x2_reduce_window(x, ceil_mode=False)
    h, w = x.shape[1:3]
    return _max_pool_2x2_even(x[:, :h - h % 2, :w - w % 2])


def bilinear_kernel(channels: int, size: int) -> np.ndarray:
    """The FCN bilinear-upsampling kernel, identity across channels, as (k, k, in, out)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.arange(size, dtype=np.float64)
    f1 = 1 - np.abs(og - center) / factor
    filt = (f1[:, None] * f1[None, :]).astype(np.float32)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = filt[:, :, None]
    return kernel


def pad_spatial(x: jax.Array, padding: int) -> jax.Array:
    """Zero-pads H and W of an NHWC array by `padding` on every side."""
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_valid_im2col(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """A VALID convolution as one matrix product over k x k patches (im2col), the patches
    taken every `stride` pixels (the networks use stride 1).

    For the big-kernel, many-channel, small-map layer (F's fc6: 7x7, 512 -> 4096 on pool5):
    the patches are small (out_h * out_w rows of k*k*in, 4.5 MB at 128x256, 56 MB at 512x1024
    per image) while the kernel is large (411 MB), and `kernel.reshape(k*k*in, out)` is free in
    row-major order, so forward and both gradients are single GEMMs with no copy of the
    kernel. XLA's CPU convolution, above all its kernel gradient, is 20x+ slower here, and a
    per-row form spent most of its time transposing kernel rows (measured: docs/performance.md).
    Same result as a VALID `lax.conv_general_dilated`.
    """
    k_h, k_w, c_in, c_out = kernel.shape
    out_h, out_w = (x.shape[1] - k_h) // stride + 1, (x.shape[2] - k_w) // stride + 1
    patches = jnp.stack([x[:, i:i + stride * (out_h - 1) + 1:stride,
                           j:j + stride * (out_w - 1) + 1:stride]
                         for i in range(k_h) for j in range(k_w)], axis=3)
    patches = patches.reshape(*patches.shape[:3], k_h * k_w * c_in)
    return jnp.dot(patches, kernel.reshape(k_h * k_w * c_in, c_out))


def conv_transpose_col2im(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The full (uncropped) stride-1 transposed convolution, y[p] = sum_i x[i] w[p - i].

    One matrix product gives every input pixel's k x k x out contribution, which are then added
    at their k x k offsets. For G's first layer (7x7, 4096 -> 256 on F's small fc7 map) this
    does no multiplications by padding zeros and avoids XLA's slow CPU convolution path.
    """
    k = kernel.shape[0]
    pieces = jnp.einsum("nhwc,abco->abnhwo", x, kernel)
    zero = jnp.zeros((), pieces.dtype)
    y = None
    for a in range(k):
        for b in range(k):
            placed = jax.lax.pad(pieces[a, b], zero, ((0, 0, 0), (a, k - 1 - a, 0),
                                                      (b, k - 1 - b, 0), (0, 0, 0)))
            y = placed if y is None else y + placed
    return y


def conv_transpose_dilated(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: int) -> jax.Array:
    """PyTorch's ConvTranspose2d written as XLA's input-dilated convolution (for reference).

    A transposed convolution is the input-gradient of a convolution: dilate the input by the
    stride and convolve with the spatially flipped kernel, padded by k - 1 - p (or cropped, when
    p > k - 1). Same result as `conv_transpose_torch`; much slower to differentiate on CPU.
    """
    k = kernel.shape[0]
    pad = max(k - 1 - padding, 0)
    crop = max(padding - (k - 1), 0)
    y = jax.lax.conv_general_dilated(
        x,
        jnp.flip(kernel, axis=(0, 1)),
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        lhs_dilation=(stride, stride),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if crop:
        y = y[:, crop:y.shape[1] - crop, crop:y.shape[2] - crop]
    return y


# A sub-pixel convolution with at most this many output channels (all phases together; G's
# to_image: 2 * 2 * 3 = 12) is a matrix product on accelerators. See conv_transpose_torch.
NARROW_PHASE_CHANNELS = 16


def on_accelerator() -> bool:
    """Whether computations run on a GPU or TPU, where some tuned forms differ from the CPU's."""
    return jax.default_backend() != "cpu"


def conv_transpose_torch(x: jax.Array, kernel: jax.Array, stride: int, padding: int,
                         plain: bool = False, phase_matmul: bool | None = None) -> jax.Array:
    """PyTorch's ConvTranspose2d (no output padding) for an HWIO kernel (k, k, in, out).

    Computed "sub-pixel": output pixel s*q + a (phase a < s) only ever meets the kernel taps
    a, a + s, a + 2s, ... So all s*s phases are one ordinary stride-1 convolution with
    t = ceil(k / s) taps and s*s*out channels (the kernel zero-padded to t*s taps), followed by
    depth-to-space, then the full output ((n - 1) * s + k) cropped by `padding` on every side.
    The padding is an explicit `jnp.pad` and the convolution VALID: XLA's CPU backend takes a
    slow generic path for the kernel gradient of an input-dilated convolution, or of a
    convolution whose padding is not "same"-like (10-40x slower, measured; see
    docs/performance.md), and never for this form. Stride 1 has a single phase and is computed
    by `conv_transpose_col2im` instead. Same result as `conv_transpose_dilated`, which
    `plain=True` computes instead.

    `phase_matmul` computes the phase convolution as one matrix product over its patches
    (`conv_valid_im2col`); by default it does so for a narrow one (at most
    NARROW_PHASE_CHANNELS outputs) on any backend but the CPU. Measured for G's to_image
    (64 -> 12 channels) at 1024x512 on an H200, kernel gradient: 11.1 ms float32 and 14.5 ms
    bfloat16 as cuDNN's convolution, 1.5 and 1.6 ms as the matrix product; on the 2-core CPU
    the matrix product is the 13x slower form (docs/performance.md).
    """
    if plain:
        return conv_transpose_dilated(x, kernel, stride, padding)
    k, s = kernel.shape[0], stride
    cin, cout = kernel.shape[2:]
    full_h, full_w = (x.shape[1] - 1) * s + k, (x.shape[2] - 1) * s + k
    if padding * 2 >= min(full_h, full_w):
        raise ValueError(f"transposed conv: padding {padding} crops away the whole "
                         f"{full_h}x{full_w} output of a {x.shape[1]}x{x.shape[2]} input")
    if s == 1:
        y = conv_transpose_col2im(x, kernel)
        return y[:, padding:full_h - padding, padding:full_w - padding]
    t = -(-k // s)
    w = jnp.pad(kernel, ((0, t * s - k), (0, t * s - k), (0, 0), (0, 0)))
    # w[s*j + a, s*i + b, c, o] -> [j, i, c, (a, b, o)], flipped over (j, i): a correlation.
    w = w.reshape(t, s, t, s, cin, cout).transpose(0, 2, 4, 1, 3, 5)
    w = jnp.flip(w, axis=(0, 1)).reshape(t, t, cin, s * s * cout)
    if phase_matmul is None:
        phase_matmul = s * s * cout <= NARROW_PHASE_CHANNELS and on_accelerator()
    y = (conv_valid_im2col if phase_matmul else _conv_valid)(pad_spatial(x, t - 1), w)
    n, qh, qw, _ = y.shape
    y = y.reshape(n, qh, qw, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, qh * s, qw * s, cout)
    return y[:, padding:full_h - padding, padding:full_w - padding]


class ConvTranspose(nn.Module):
    """Transposed convolution with PyTorch's output size: (n - 1) * stride + k - 2 * padding."""

    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    use_bias: bool = False
    kernel_init: Initializer = gan_kernel_init
    bias_init: Initializer = gan_bias_init
    dtype: Dtype = jnp.float32
    plain: bool = False  # XLA's input-dilated convolution instead of the CPU-tuned forms

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        y = conv_transpose_torch(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                                 self.padding, plain=self.plain)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


class Im2ColConv(nn.Module):
    """A VALID stride-1 convolution with nn.Conv's parameters (kernel (k, k, in, out), bias),
    computed by `conv_valid_im2col`: for large kernels over many channels on small maps.
    `plain=True` computes it with XLA's convolution instead (same parameters, same result)."""

    features: int
    kernel_size: int
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    # As nn.Conv's: the initialisers draw in this dtype also where jax_enable_x64 makes their
    # default float64, so that a float64 run starts from the same values.
    param_dtype: Dtype = jnp.float32
    plain: bool = False

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        conv = _conv_valid if self.plain else conv_valid_im2col
        y = conv(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ResBlock(nn.Module):
    """LSD's one-conv residual block: x + dropout(act(IN(conv3x3(x)))).

    Not the usual two-conv block (docs/methods.md, section 2). G uses ReLU and no conv bias; D
    LeakyReLU(0.2) and a conv bias. Dropout is element-wise, p = 0.5.
    """

    use_bias: bool
    leaky: bool
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=self.use_bias,
                    kernel_init=gan_kernel_init, bias_init=gan_bias_init, dtype=self.dtype,
                    name="conv_layer")(x)
        h = instance_norm(h)
        h = nn.leaky_relu(h, 0.2) if self.leaky else nn.relu(h)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        return x + h


def scaled(width: int, multiplier: float) -> int:
    """A channel count scaled by the width multiplier, never below 1."""
    return max(1, int(round(width * multiplier)))


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with aligned corners: output i samples
    the input at i * (n_in - 1) / (n_out - 1)."""
    matrix = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    position = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    low = np.minimum(np.floor(position).astype(int), n_in - 2)
    frac = (position - low).astype(np.float32)
    matrix[np.arange(n_out), low] = 1.0 - frac
    matrix[np.arange(n_out), low + 1] += frac
    return matrix


def upsample_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """NHWC bilinear resize with aligned corners (PyTorch's `F.interpolate(mode="bilinear",
    align_corners=True)`), as two small matrix products: exact, and plain to differentiate."""
    rows = jnp.asarray(_align_corners_matrix(size[0], x.shape[1]), x.dtype)
    cols = jnp.asarray(_align_corners_matrix(size[1], x.shape[2]), x.dtype)
    return jnp.einsum("ph,nhwc,qw->npqc", rows, x, cols)
