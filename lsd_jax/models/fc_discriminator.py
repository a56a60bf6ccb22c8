"""AdaptSegNet's fully convolutional discriminator, also ADVENT's (docs/methods.md, section 8).

Five 4x4 stride-2 convolutions (padding 1, with bias), 64 -> 128 -> 256 -> 512 -> 1 channels,
LeakyReLU(0.2) after the first four; no normalisation, no dropout, no sigmoid: one logit per
patch, the map 1/32 of the input (1024x512 -> 32x16). Its input is a per-pixel map over the
classes: softmax probabilities (AdaptSegNet) or self-information (ADVENT).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.models.layers import Dtype, scaled

FEATURES = (64, 128, 256, 512)


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch's default Conv2d weight init, which the reference codes keep: kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); flax kernels are (kh, kw, in, out)."""
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int):
    """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


class FCDiscriminator(nn.Module):
    """(N, H, W, C) class maps -> (N, H', W', 1) domain logits (source 0, target 1); each conv
    takes a size n to floor(n / 2), so H' = H / 32 for a multiple of 32.

    Attributes:
      width: multiplier on every hidden channel count (1.0 = the reference).
      dtype: compute dtype; parameters stay float32.

    Parameter names: conv1 ... conv4, classifier (the reference's conv1-conv4 and classifier).
    """

    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: jax.Array) -> jax.Array:
        if maps.ndim != 4:
            raise ValueError(f"FCDiscriminator: expected class maps (N, H, W, C), got shape "
                             f"{tuple(maps.shape)}")
        h = maps.astype(self.dtype)
        names = [f"conv{i}" for i in range(1, len(FEATURES) + 1)] + ["classifier"]
        widths = [scaled(f, self.width) for f in FEATURES] + [1]
        for i, (name, features) in enumerate(zip(names, widths)):
            h = nn.Conv(features, (4, 4), strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                        kernel_init=torch_default_kernel_init,
                        bias_init=torch_default_bias_init(16 * h.shape[-1]), name=name)(h)
            if i < len(FEATURES):
                h = nn.leaky_relu(h, 0.2)
        return h
