"""The ImageNet ResNet of Keras' `ResNet50` / `ResNet101` (Caffe style), as a feature network.

FCAN's appearance adaptation (docs/methods.md, section 11) matches the features and Gram
matrices of an ImageNet ResNet-50 at conv1 and at the end of each stage (res2c, res3d, res4f,
res5c in Caffe's names). This network returns exactly those, by stage name: "conv1" (after its
BatchNorm and ReLU), "res2" ... "res5" (each stage's last block).

It is the DeepLab-v2 ResNet (`models.deeplab`) without dilation (output stride 32) and with the
ImageNet stem pool (3x3/2, padding 1, floor mode, as Keras' ZeroPadding2D(1) + MaxPool2D(3, 2)):
the same blocks and variable names, so one importer (`weights.import_keras_resnet`) fills
both. Keras' convolutions have biases where these have none; the importer folds each bias into
the BatchNorm that follows it, which is exact, and Keras' BatchNorm epsilon into the variance.
Inference only: BatchNorm uses its running statistics.

Input: Caffe's convention, as F's: BGR, 0-255, the ImageNet mean subtracted.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsd_jax.models.deeplab import RESNET_EXPANSION, Bottleneck, TorchBatchNorm, deeplab_init
from lsd_jax.models.layers import Dtype, scaled

RESNET50_BLOCKS = (3, 4, 6, 3)
# (planes, stride) of the four stages; the feature of stage s is called f"res{s + 1}".
IMAGENET_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
FEATURE_NAMES = ("conv1", "res2", "res3", "res4", "res5")


class ImageNetResNet(nn.Module):
    """ResNet-50 (blocks 3, 4, 6, 3) or -101 (3, 4, 23, 3); returns {name: feature map} for
    FEATURE_NAMES. `width` scales every channel count (small versions for tests)."""

    width: float = 1.0
    blocks: Sequence[int] = RESNET50_BLOCKS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.dtype)
        stem = scaled(64, self.width)
        x = nn.Conv(stem, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=deeplab_init,
                    dtype=self.dtype, name="conv1")(x)
        x = nn.relu(TorchBatchNorm(stem, name="bn1")(x, False))
        features = {"conv1": x}
        # After the ReLU every value is >= 0, so Keras' zero padding equals max-pool's -inf.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        channels = stem
        for stage, ((planes, stride), count) in enumerate(zip(IMAGENET_STAGES, self.blocks), 1):
            planes = scaled(planes, self.width)
            for j in range(count):
                first = j == 0
                x = Bottleneck(planes, stride if first else 1, 1,
                               project=first and (stride != 1 or
                                                  channels != planes * RESNET_EXPANSION),
                               dtype=self.dtype, name=f"layer{stage}_{j}")(x, False)
                channels = planes * RESNET_EXPANSION
            features[f"res{stage + 1}"] = x
        return features
