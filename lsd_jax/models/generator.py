"""G: reconstructs an image in [0, 1] from F's (fc7, pool4, pool3)
(docs/methods.md, section 2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.layers import (ConvTranspose, Dtype, ResBlock, at_least_float32, instance_norm,
                                   scaled)

# (kernel, stride, padding, output-width factor of ngf) of the five upsampling stages; pool4 is
# concatenated before stage 3 and pool3 before stage 4.
G_STAGES = ((7, 1, 0, 4), (3, 2, 1, 8), (3, 2, 1, 4), (5, 2, 2, 2), (5, 2, 2, 1))
RES_BLOCKS_PER_STAGE = 2


class Generator(nn.Module):
    """Attributes:
      width: multiplier on ngf = 64 (1.0 = the reference).
      dtype: compute dtype; parameters stay float32.
      remat: rematerialise each upsampling stage (transposed conv, IN, ReLU, ResBlocks) in the
        backward pass, keeping only the stage inputs. Parameter names and results are the same.
      plain_kernels: XLA's input-dilated convolution for the transposed convolutions instead of
        the CPU-tuned col2im and sub-pixel forms (same parameters and results).

    Parameter names: up{1..5} (transposed convs), res{stage}_{0,1} (ResBlocks), to_image.
    """

    width: float = 1.0
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    remat: bool = False
    plain_kernels: bool = False

    @nn.compact
    def __call__(self, fc7: jax.Array, pool4: jax.Array, pool3: jax.Array, train: bool):
        ngf = scaled(64, self.width)
        h = fc7.astype(self.dtype)
        skips = {3: pool4, 4: pool3}
        for stage, (k, s, p, mult) in enumerate(G_STAGES, 1):
            if stage in skips:
                skip = skips[stage]
                if skip.shape[1:3] != h.shape[1:3]:
                    raise ValueError(
                        f"G stage {stage}: features {h.shape[1]}x{h.shape[2]} do not line up with "
                        f"the skip input {skip.shape[1]}x{skip.shape[2]}; training images must be "
                        "multiples of 32 in height and width")
                h = jnp.concatenate([h, skip.astype(self.dtype)], axis=-1)

            def upsampling_stage(module, h, stage=stage, k=k, s=s, p=p, mult=mult):
                h = ConvTranspose(ngf * mult, k, s, p, dtype=self.dtype,
                                  plain=self.plain_kernels, name=f"up{stage}")(h)
                h = nn.relu(instance_norm(h))
                for i in range(RES_BLOCKS_PER_STAGE):
                    h = ResBlock(use_bias=False, leaky=False, dropout_rate=self.dropout_rate,
                                 dtype=self.dtype, name=f"res{stage}_{i}")(h, train)
                return h
            # Lifted remat over a function of the module keeps the parameter names.
            h = (nn.remat(upsampling_stage) if self.remat else upsampling_stage)(self, h)
        image = ConvTranspose(3, 8, 2, 100, use_bias=True, dtype=self.dtype,
                              plain=self.plain_kernels, name="to_image")(h)
        return nn.sigmoid(at_least_float32(image))
