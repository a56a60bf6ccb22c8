"""DeepLab-v2 segmentation networks of the comparison methods (docs/methods.md, section 6):
ResNet-101 ("DeeplabMulti" of the AdaptSegNet and ADVENT codes) and VGG16 LargeFOV.

Both predict at 1/8 of the input size (output stride 8); the methods upsample the scores.
The layers are the plain `lax`/flax forms (no custom kernels), so their gradients are XLA's own.

Variables, in the collections a `NetState` carries:
- "params": the convolutions (trained);
- "frozen": BatchNorm's scale and bias, which the references never train;
- "batch_stats": BatchNorm's running mean and variance.

BatchNorm as the references use it (`bn_statistics="batch"`): in training the batch's own
statistics normalise, and when "batch_stats" is mutable the running ones are updated as PyTorch
does (momentum 0.1, unbiased variance), by every forward pass, source and target alike; in
evaluation the running statistics normalise. `bn_statistics="frozen"` always uses the running
statistics (the common fine-tuning alternative; then a run with adversarial weights 0 is the
source-only baseline, docs/methods.md section 1's pitfall).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.layers import Dtype, scaled
from lsd_jax.models.vgg_fcn import backbone_init

RESNET101_BLOCKS = (3, 4, 23, 3)
RESNET_EXPANSION = 4
ASPP_DILATIONS = (6, 12, 18, 24)
BN_STATISTICS = ("batch", "frozen")
# The public AdaptSegNet code returns from inside its classifier's loop, so only the first two
# branches (dilations 6 and 12) are summed; its released models were trained so.
ASPP_BRANCHES = (4, 2)

# The references initialise every convolution N(0, 0.01) (weights are then loaded from an
# ImageNet / COCO DeepLab model, except the classifiers).
deeplab_init = nn.initializers.normal(stddev=0.01)


def check_bn_statistics(value: str) -> None:
    if value not in BN_STATISTICS:
        raise ValueError(f"config.model.bn_statistics={value!r}: expected one of {BN_STATISTICS}")


def max_pool_3x3_ceil(x: jax.Array) -> jax.Array:
    """3x3/2 max-pool with padding 1 in PyTorch's ceil mode (ResNet's stem in DeepLab-v2):
    the output is ceil((n - 1) / 2) + 1 long, unless the last window would start in the right
    padding (PyTorch's rule)."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n + 2 - 3) // 2) + 1
        if (out - 1) * 2 >= n + 1:
            out -= 1
        pads.append((1, (out - 1) * 2 + 3 - (n + 1)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), *pads, (0, 0)))


class TorchBatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's statistics and update rule; see the module docstring."""

    features: int
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, use_batch_statistics: bool) -> jax.Array:
        shape = (self.features,)
        scale = self.variable("frozen", "scale", jnp.ones, shape, jnp.float32)
        bias = self.variable("frozen", "bias", jnp.zeros, shape, jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        if use_batch_statistics:
            # Statistics in float32 at least (bfloat16 activations), in float64 when x is.
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            m, v = wide.mean((0, 1, 2)), wide.var((0, 1, 2))
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = x.size // self.features
                mean.value = (1 - self.momentum) * mean.value + self.momentum * m
                var.value = (1 - self.momentum) * var.value + self.momentum * v * n / max(n - 1, 1)
        else:
            m, v = mean.value, var.value
        inv = scale.value * jax.lax.rsqrt(v + self.epsilon)
        return (x * inv.astype(x.dtype) + (bias.value - m * inv).astype(x.dtype)).astype(x.dtype)


class ASPPClassifier(nn.Module):
    """DeepLab-v2's classifier: parallel 3x3 convolutions with dilation = padding = 6, 12, 18,
    24 to the classes, with biases, summed. `branches=2` sums only the first two (the public
    AdaptSegNet code's form); all four exist either way, so its checkpoints load."""

    num_classes: int
    branches: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.branches not in ASPP_BRANCHES:
            raise ValueError(f"ASPP branches={self.branches}: expected one of {ASPP_BRANCHES}")
        out = None
        for i, d in enumerate(ASPP_DILATIONS):
            if i >= self.branches and not self.is_initializing():
                break
            y = nn.Conv(self.num_classes, (3, 3), padding=d, kernel_dilation=d, use_bias=True,
                        kernel_init=deeplab_init, dtype=self.dtype, name=f"conv{i}")(x)
            if i < self.branches:
                out = y if out is None else out + y
        return out


class Bottleneck(nn.Module):
    """ResNet bottleneck, Caffe style: the stride sits on the first 1x1 convolution."""

    planes: int
    stride: int = 1
    dilation: int = 1
    project: bool = False  # a 1x1 conv + BN on the shortcut
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, batch_statistics: bool) -> jax.Array:
        def conv(features, size, name, stride=1, dilation=1):
            return nn.Conv(features, (size, size), strides=stride, padding=dilation * (size // 2),
                           kernel_dilation=dilation, use_bias=False, kernel_init=deeplab_init,
                           dtype=self.dtype, name=name)

        out_features = self.planes * RESNET_EXPANSION
        y = conv(self.planes, 1, "conv1", stride=self.stride)(x)
        y = nn.relu(TorchBatchNorm(self.planes, name="bn1")(y, batch_statistics))
        y = conv(self.planes, 3, "conv2", dilation=self.dilation)(y)
        y = nn.relu(TorchBatchNorm(self.planes, name="bn2")(y, batch_statistics))
        y = conv(out_features, 1, "conv3")(y)
        y = TorchBatchNorm(out_features, name="bn3")(y, batch_statistics)
        shortcut = x
        if self.project:
            shortcut = conv(out_features, 1, "downsample_conv", stride=self.stride)(x)
            shortcut = TorchBatchNorm(out_features, name="downsample_bn")(shortcut,
                                                                          batch_statistics)
        return nn.relu(y + shortcut)


# (planes, stride, dilation) of layer1..layer4: output stride 8.
RESNET_STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))


class DeepLabV2ResNet(nn.Module):
    """DeepLab-v2 ResNet-101 (docs/methods.md section 6). Returns (score, layer4, layer3) and,
    with `aux_classifier`, the auxiliary score on layer3 after them; scores at 1/8 size.

    `train` selects BatchNorm's batch statistics when `bn_statistics` is "batch" (no dropout)."""

    num_classes: int
    width: float = 1.0
    blocks: Sequence[int] = RESNET101_BLOCKS
    aux_classifier: bool = False
    aspp_branches: int = 4
    bn_statistics: str = "batch"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        check_bn_statistics(self.bn_statistics)
        batch_statistics = train and self.bn_statistics == "batch"
        x = x.astype(self.dtype)
        stem = scaled(64, self.width)
        x = nn.Conv(stem, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=deeplab_init,
                    dtype=self.dtype, name="conv1")(x)
        x = nn.relu(TorchBatchNorm(stem, name="bn1")(x, batch_statistics))
        x = max_pool_3x3_ceil(x)
        features, channels = [], stem
        for stage, ((planes, stride, dilation), count) in enumerate(
                zip(RESNET_STAGES, self.blocks), 1):
            planes = scaled(planes, self.width)
            for j in range(count):
                first = j == 0
                x = Bottleneck(planes, stride if first else 1, dilation,
                               project=first and (stride != 1 or
                                                  channels != planes * RESNET_EXPANSION),
                               dtype=self.dtype, name=f"layer{stage}_{j}")(x, batch_statistics)
                channels = planes * RESNET_EXPANSION
            features.append(x)
        layer3, layer4 = features[2], features[3]
        score = ASPPClassifier(self.num_classes, self.aspp_branches, self.dtype,
                               name="classifier")(layer4)
        outputs = (score, layer4, layer3)
        if self.aux_classifier:
            outputs += (ASPPClassifier(self.num_classes, self.aspp_branches, self.dtype,
                                       name="classifier_aux")(layer3),)
        return outputs


# DeepLab-v2 VGG16 LargeFOV: VGG16's convolutions with pool4 and pool5 removed and conv5
# dilated by 2, then fc6 and fc7 as dilated 3x3 convolutions (docs/methods.md section 1 item 7).
LARGEFOV_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LARGEFOV_FC = 1024


class DeepLabV2VGG16(nn.Module):
    """DeepLab-v2 VGG16 LargeFOV. Returns (score, fc7); the score at 1/8 size. Its pools
    (after conv1-conv3) are torchvision's 2x2/2 floor-mode max-pools, as the AdaptSegNet code
    builds it from torchvision's VGG16. No dropout: `train` changes nothing."""

    num_classes: int
    width: float = 1.0
    aspp_branches: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        del train
        x = x.astype(self.dtype)
        for b, widths in enumerate(LARGEFOV_BLOCKS, 1):
            dilation = 2 if b == 5 else 1
            for i, w in enumerate(widths, 1):
                x = nn.relu(nn.Conv(scaled(w, self.width), (3, 3), padding=dilation,
                                    kernel_dilation=dilation, kernel_init=backbone_init,
                                    dtype=self.dtype, name=f"conv{b}_{i}")(x))
            if b <= 3:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for name in ("fc6", "fc7"):
            x = nn.relu(nn.Conv(scaled(LARGEFOV_FC, self.width), (3, 3), padding=4,
                                kernel_dilation=4, kernel_init=backbone_init,
                                dtype=self.dtype, name=name)(x))
        score = ASPPClassifier(self.num_classes, self.aspp_branches, self.dtype,
                               name="classifier")(x)
        return score, x
