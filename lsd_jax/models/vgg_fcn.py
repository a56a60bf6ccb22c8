"""F + C: VGG16 FCN-8s ("at once" variant) as in LSD-seg (docs/methods.md, section 2).

Returns (score, fc7, pool4, pool3): the class scores at input size for the segmentation loss and
the three feature maps that G reconstructs an image from.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.layers import (Dtype, Im2ColConv, bilinear_kernel, conv_transpose_torch,
                                   max_pool_ceil, pad_spatial, scaled)

# Caffe preprocessing for ImageNet VGG16 weights: BGR, 0-255, this mean subtracted
# (docs/methods.md, sections 2 and 5).
VGG_MEAN_BGR = (104.00699, 116.66877, 122.67892)

VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FC_WIDTH = 4096

# Offsets at which the FCN-8s head crops its skip scores and its output
# (docs/methods.md, section 2).
POOL4_CROP, POOL3_CROP, OUTPUT_CROP = 5, 9, 31

# The three transposed convolutions of the head: (name, kernel size, stride).
UPSCORE_LAYERS = (("upscore2", 4, 2), ("upscore_pool4", 4, 2), ("upscore8", 16, 8))

# Backbone convolutions without pretrained weights: He-normal, the usual choice before ReLU.
backbone_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def check_training_size(height: int, width: int) -> None:
    """Training crops must be multiples of 32: only then do G's skip connections line up."""
    bad = [f"{name}={v}" for name, v in (("height", height), ("width", width))
           if v < 32 or v % 32]
    if bad:
        raise ValueError(
            f"training image size {height}x{width} is not usable: {', '.join(bad)} must be a "
            "positive multiple of 32 (e.g. 320x640 or 512x1024), because G's concatenations with "
            "pool4/pool3 and its output size only line up with F's features then. Evaluation "
            "with F alone works at any size.")


def check_image(x: jax.Array, what: str = "image") -> None:
    """An NHWC batch of 3-channel images, or a clear error."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{what}: expected a batch of RGB/BGR images shaped (N, H, W, 3), "
                         f"got shape {tuple(x.shape)}")


def _crop(x: jax.Array, offset: int, height: int, width: int, what: str) -> jax.Array:
    if x.shape[1] < offset + height or x.shape[2] < offset + width:
        raise ValueError(f"FCN-8s head: {what} of size {x.shape[1]}x{x.shape[2]} is too small to "
                         f"crop {height}x{width} at offset {offset}; the input image is too small")
    return x[:, offset:offset + height, offset:offset + width]


class FCN8s(nn.Module):
    """VGG16 FCN-8s with padding 100, ceil-mode pools and channel dropout on fc6/fc7.

    Attributes:
      num_classes: C's output channels (19 Cityscapes train classes by default).
      width: multiplier on every VGG and fc width (1.0 = the reference; small for tests).
      dropout_rate: channel dropout after fc6 and fc7.
      dtype: compute dtype; parameters stay float32.
      remat: rematerialise each VGG block in the backward pass (keep only the block's pooled
        output, recompute its convolutions): less activation memory for ~one more forward of
        the backbone. Parameter names and results are the same either way.
      plain_kernels: compute the pools, fc6/fc7 and the head's transposed convolutions with
        XLA's plain operations (reduce_window, conv_general_dilated) instead of the forms tuned
        for XLA:CPU in layers.py. Same parameters and results; the reference for tests.
      aux_classifier: also return the scores of an auxiliary classifier on pool4 (a 1x1 conv,
        "score_aux"), brought to the input size by the same frozen upsampling layers and crops
        as the main score (pool4's path of FCN-16s). For the multi-level output-space methods
        (docs/methods.md, section 8), whose reference puts it on ResNet's layer3; FCN-8s has no
        published multi-level setting.

    The three bilinear transposed convolutions live in the variable collection "frozen", not in
    "params": they are never trained (docs/methods.md, section 2), and keeping them out of
    "params" means no gradient and no optimizer state is ever computed for them.
    """

    num_classes: int = 19
    width: float = 1.0
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    blocks: Sequence[Sequence[int]] = VGG_BLOCKS
    remat: bool = False
    plain_kernels: bool = False
    aux_classifier: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        check_image(x, "F's input")
        height, width = x.shape[1:3]
        conv = lambda features, name, **kw: nn.Conv(  # noqa: E731
            features, kw.pop("kernel", (3, 3)), padding=kw.pop("padding", 1), dtype=self.dtype,
            kernel_init=kw.pop("init", backbone_init), name=name, **kw)

        h = x.astype(self.dtype)
        pools = []
        for b, widths in enumerate(self.blocks, 1):
            def vgg_block(module, h, b=b, widths=widths):
                for i, w in enumerate(widths, 1):
                    if (b, i) == (1, 1):
                        h = nn.relu(module._conv1_1(scaled(w, self.width), h))
                    else:
                        h = nn.relu(conv(scaled(w, self.width), f"conv{b}_{i}")(h))
                return max_pool_ceil(h, plain=self.plain_kernels)
            # Lifted remat over a function of the module keeps the parameter names conv{b}_{i}.
            h = (nn.remat(vgg_block) if self.remat else vgg_block)(self, h)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]

        fc = scaled(FC_WIDTH, self.width)
        # Channel dropout (PyTorch Dropout2d): whole feature maps, so broadcast over H and W.
        drop = lambda t: nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2),  # noqa: E731
                                    deterministic=not train)(t)
        # fc6 (7x7 over 512 channels of a small map) and fc7 (1x1, 4096 -> 4096) as single
        # matmuls with free kernel reshapes: XLA's CPU convolution is very slow for fc6 and
        # copies the transposed fc7 kernel (see Im2ColConv). Same parameters as an nn.Conv.
        fc_layer = lambda k, name: Im2ColConv(fc, k, kernel_init=backbone_init,  # noqa: E731
                                              dtype=self.dtype, plain=self.plain_kernels,
                                              name=name)
        h = drop(nn.relu(fc_layer(7, "fc6")(h)))
        fc7 = drop(nn.relu(fc_layer(1, "fc7")(h)))

        zero = nn.initializers.zeros
        score_conv = lambda name: conv(self.num_classes, name, kernel=(1, 1),  # noqa: E731
                                       padding=0, init=zero)
        up = {name: self._frozen_upsampler(name, k) for name, k, _ in UPSCORE_LAYERS}
        stride = {name: s for name, _, s in UPSCORE_LAYERS}

        def upsample(name, t):
            return conv_transpose_torch(t, up[name].astype(self.dtype), stride[name], 0,
                                        plain=self.plain_kernels)

        up2 = upsample("upscore2", score_conv("score_fr")(fc7))
        s4 = _crop(score_conv("score_pool4")(pool4), POOL4_CROP, *up2.shape[1:3], "score_pool4")
        up4 = upsample("upscore_pool4", up2 + s4)
        s3 = _crop(score_conv("score_pool3")(pool3), POOL3_CROP, *up4.shape[1:3], "score_pool3")
        score = _crop(upsample("upscore8", up4 + s3), OUTPUT_CROP, height, width, "upscore8")
        if not self.aux_classifier:
            return score, fc7, pool4, pool3
        aux = _crop(score_conv("score_aux")(pool4), POOL4_CROP, *up2.shape[1:3], "score_aux")
        aux = _crop(upsample("upscore8", upsample("upscore_pool4", aux)), OUTPUT_CROP, height,
                    width, "score_aux")
        return score, fc7, pool4, pool3, aux

    def _conv1_1(self, features: int, image: jax.Array) -> jax.Array:
        """conv1_1 (3x3 over the 3 colour channels, padding 100): the padding as its own op,
        then one matrix product over the 27-value patches (Im2ColConv). Same parameters as an
        nn.Conv. Measured on an H200 at 1024x512 (docs/performance.md): cuDNN's kernel
        gradient of the padded 3-channel convolution takes 114 ms in bfloat16 (22 ms in
        float32), most of the iteration; as a matrix product it takes 0.4 ms."""
        return Im2ColConv(features, 3, kernel_init=backbone_init, dtype=self.dtype,
                          plain=self.plain_kernels, name="conv1_1")(pad_spatial(image, 100))

    def _frozen_upsampler(self, name: str, size: int) -> jax.Array:
        kernel = bilinear_kernel(self.num_classes, size)
        return self.variable("frozen", name, lambda: jnp.asarray(kernel)).value
