"""D: a patch discriminator with a four-way domain head and a class head
(docs/methods.md, section 2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.layers import (Dtype, ResBlock, gan_bias_init, gan_kernel_init, instance_norm,
                                   max_pool_floor, scaled)
from lsd_jax.models.vgg_fcn import check_image

NUM_DOMAIN_LABELS = 4  # source real, source fake, target real, target fake
RES_GROUPS, RES_BLOCKS_PER_GROUP = 3, 3


class Discriminator(nn.Module):
    """Returns (out_s, out_c): per-patch domain logits (4) and class logits (num_classes).

    Attributes:
      num_classes: classes of the auxiliary head.
      width: multiplier on ndf = 64; the trunk is 2 * ndf wide (1.0 = the reference).
      dtype: compute dtype; parameters stay float32.
      plain_kernels: XLA's reduce_window for the pools instead of the CPU-tuned form.

    Parameter names: stem, res{group}_{i} (ResBlocks), out_s, out_c.
    """

    num_classes: int = 19
    width: float = 1.0
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    plain_kernels: bool = False

    @nn.compact
    def __call__(self, image: jax.Array, train: bool):
        check_image(image, "D's input")
        d = 2 * scaled(64, self.width)
        conv = lambda features, k, s, p, name: nn.Conv(  # noqa: E731
            features, (k, k), strides=s, padding=p, dtype=self.dtype,
            kernel_init=gan_kernel_init, bias_init=gan_bias_init, name=name)
        h = conv(d, 4, 2, 2, "stem")(image.astype(self.dtype))
        h = nn.leaky_relu(instance_norm(h), 0.2)
        for group in range(1, RES_GROUPS + 1):
            if group > 1:
                h = max_pool_floor(h, plain=self.plain_kernels)
            for i in range(RES_BLOCKS_PER_GROUP):
                h = ResBlock(use_bias=True, leaky=True, dropout_rate=self.dropout_rate,
                             dtype=self.dtype, name=f"res{group}_{i}")(h, train)
        out_s = conv(NUM_DOMAIN_LABELS, 3, 1, 1, "out_s")(h)
        out_c = conv(self.num_classes, 3, 1, 1, "out_c")(h)
        return out_s, out_c
