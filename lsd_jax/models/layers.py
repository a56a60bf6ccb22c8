"""Layers shared by F, G and D, with PyTorch's semantics where the reference relies on them."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# G and D: conv and transposed-conv kernels N(0, 0.02), biases U(-0.01, 0.01) (SPEC section 2).
gan_kernel_init = nn.initializers.normal(stddev=0.02)


def gan_bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-0.01, maxval=0.01)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm2d without scale or shift: per sample and channel over H and W.

    Statistics are taken in float32 whatever the compute dtype, as PyTorch's autocast does.
    """
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def max_pool_ceil(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool in PyTorch's ceil mode: a partial window at the bottom/right is kept."""
    h, w = x.shape[1:3]
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)))


def max_pool_floor(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool in floor mode (a trailing odd row/column is dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


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


def conv_transpose_torch(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """PyTorch's ConvTranspose2d (no output padding) for an HWIO kernel (k, k, in, out).

    A transposed convolution is the input-gradient of a convolution: dilate the input by the
    stride and convolve with the spatially flipped kernel, padded by k - 1 - p. When PyTorch's
    padding p exceeds k - 1 (G's last layer: k 8, p 100) that padding would be negative; it is
    done as a crop of the full output instead, because XLA's kernel gradient of a negatively
    padded dilated convolution is very slow on CPU (hundreds of times, measured).
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

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        y = conv_transpose_torch(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                                 self.padding)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


class ResBlock(nn.Module):
    """LSD's one-conv residual block: x + dropout(act(IN(conv3x3(x)))).

    Not the usual two-conv block (SPEC section 2). G uses ReLU and no conv bias; D LeakyReLU(0.2)
    and a conv bias. Dropout is element-wise, p = 0.5.
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
