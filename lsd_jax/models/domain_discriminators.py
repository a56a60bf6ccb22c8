"""The feature-level domain discriminators (docs/methods.md, section 10): one domain decision
per location of S's features (or class maps), source 0, target 1.

PixelDiscriminator: 1x1 convolutions with ReLU and dropout on the hidden layers, two outputs
    (the per-pixel 2-way classifier of ADDA for segmentation and of FCNs in the Wild):
    ADDA on fc7 4096 -> 1024 -> 512 -> 2 (channel dropout), on the score map C -> 512 -> 256
    -> 2; FCNs in the Wild 4096 -> 1024 -> 1024 -> 2 (dropout).
ASPPDiscriminator: FCAN's: four parallel 3x3 convolutions of 128 channels with dilations
    1, 2, 3, 4, concatenated (512), then a 1x1 convolution to one channel.

Both return one logit map (N, H, W, 1), > 0 for "target": for the two-output classifier the
difference of its two logits, which makes its 2-way softmax cross-entropy exactly the binary
cross-entropy of `output_space.gan_loss`, so every method shares one loss.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.fc_discriminator import torch_default_bias_init, torch_default_kernel_init
from lsd_jax.models.layers import Dtype, scaled

ASPP_DILATIONS = (1, 2, 3, 4)
ASPP_FEATURES = 128


def _check_maps(maps: jax.Array, what: str) -> None:
    if maps.ndim != 4:
        raise ValueError(f"{what}: expected feature maps (N, H, W, C), got shape "
                         f"{tuple(maps.shape)}")


def _conv(features: int, size: int, fan_in: int, dtype, name: str, dilation: int = 1):
    """PyTorch's default Conv2d initialisation, as the reference implementations keep."""
    return nn.Conv(features, (size, size), kernel_dilation=dilation,
                   padding=dilation * (size // 2), dtype=dtype,
                   kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(size * size * fan_in), name=name)


class PixelDiscriminator(nn.Module):
    """(N, H, W, C) -> (N, H, W, 1) domain logits, each location on its own.

    Attributes:
      hidden: the hidden layers' channel counts at width 1 (e.g. (1024, 512)).
      width: multiplier on the hidden channel counts.
      dropout_rate: dropout after each hidden layer's ReLU (0 = none).
      channel_dropout: drop whole channels of an image (PyTorch's Dropout2d) instead of single
        values.

    Parameter names: hidden0, hidden1, ..., classifier (2 outputs: source, target).
    """

    hidden: tuple[int, ...] = (1024, 512)
    width: float = 1.0
    dropout_rate: float = 0.5
    channel_dropout: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: jax.Array, train: bool = False) -> jax.Array:
        _check_maps(maps, "PixelDiscriminator")
        h = maps.astype(self.dtype)
        for i, features in enumerate(self.hidden):
            h = nn.relu(_conv(scaled(features, self.width), 1, h.shape[-1], self.dtype,
                              f"hidden{i}")(h))
            if self.dropout_rate:
                h = nn.Dropout(self.dropout_rate,
                               broadcast_dims=(1, 2) if self.channel_dropout else (),
                               deterministic=not train)(h)
        logits = _conv(2, 1, h.shape[-1], self.dtype, "classifier")(h)
        return logits[..., 1:] - logits[..., :1]


class ASPPDiscriminator(nn.Module):
    """(N, H, W, C) -> (N, H, W, 1) domain logits from four dilated 3x3 views of each location.

    The description gives no nonlinearity; a ReLU after the concatenation is this
    implementation's choice (without one D would be a single linear map of the features).

    Parameter names: aspp1 ... aspp4 (dilations 1-4), classifier.
    """

    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout: the signature is every domain discriminator's
        _check_maps(maps, "ASPPDiscriminator")
        h = maps.astype(self.dtype)
        features = scaled(ASPP_FEATURES, self.width)
        branches = [_conv(features, 3, h.shape[-1], self.dtype, f"aspp{i + 1}", dilation)(h)
                    for i, dilation in enumerate(ASPP_DILATIONS)]
        h = nn.relu(jnp.concatenate(branches, axis=-1))
        return _conv(1, 1, h.shape[-1], self.dtype, "classifier")(h)
