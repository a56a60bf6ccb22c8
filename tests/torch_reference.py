"""The three LSD networks in PyTorch, transcribed from docs/methods.md, section 2, with the
reference code's module names and nn.Sequential positions, so that their state_dicts carry
exactly the keys of LSD-seg checkpoints. Tests use them to check our importers and our
networks against PyTorch.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def bilinear_upsampling_weight(channels: int, size: int) -> torch.Tensor:
    """The FCN bilinear kernel, identity across channels, in ConvTranspose2d's (in, out, k, k)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    weight = np.zeros((channels, channels, size, size), np.float64)
    weight[range(channels), range(channels)] = filt
    return torch.from_numpy(weight).float()


class FCN8sLSD(nn.Module):
    """VGG16 FCN-8s "at once": conv1_1 padded by 100, ceil-mode pools, Dropout2d after fc6/fc7.

    forward returns (score, fc7, pool4, pool3), all NCHW.
    """

    def __init__(self, n_class: int = 19):
        super().__init__()
        cin = 3
        for b, widths in enumerate(VGG_BLOCKS, 1):
            for i, width in enumerate(widths, 1):
                padding = 100 if (b, i) == (1, 1) else 1
                setattr(self, f"conv{b}_{i}", nn.Conv2d(cin, width, 3, padding=padding))
                cin = width
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.drop6 = nn.Dropout2d()
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop7 = nn.Dropout2d()
        self.score_fr = nn.Conv2d(4096, n_class, 1)
        self.score_pool3 = nn.Conv2d(256, n_class, 1)
        self.score_pool4 = nn.Conv2d(512, n_class, 1)
        self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        self._initialize_weights()

    def _initialize_weights(self):
        # As the reference: convolutions zero (pretrained weights replace them), upsamplers
        # bilinear and never trained.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.data.copy_(bilinear_upsampling_weight(m.in_channels, m.kernel_size[0]))
                m.weight.requires_grad_(False)

    def forward(self, x):
        h = x
        pools = []
        for b, widths in enumerate(VGG_BLOCKS, 1):
            for i in range(1, len(widths) + 1):
                h = F.relu(getattr(self, f"conv{b}_{i}")(h))
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        h = self.drop6(F.relu(self.fc6(h)))
        fc7 = self.drop7(F.relu(self.fc7(h)))

        upscore2 = self.upscore2(self.score_fr(fc7))
        h = self.score_pool4(pool4)
        h = h[:, :, 5:5 + upscore2.size(2), 5:5 + upscore2.size(3)]
        upscore_pool4 = self.upscore_pool4(upscore2 + h)
        h = self.score_pool3(pool3)
        h = h[:, :, 9:9 + upscore_pool4.size(2), 9:9 + upscore_pool4.size(3)]
        h = self.upscore8(upscore_pool4 + h)
        score = h[:, :, 31:31 + x.size(2), 31:31 + x.size(3)].contiguous()
        return score, fc7, pool4, pool3


class ResnetBlock(nn.Module):
    """x + dropout(act(InstanceNorm(conv3x3(x)))), the reference's one-conv residual block."""

    def __init__(self, dim: int, bias: bool, leaky: bool):
        super().__init__()
        self.conv_layer = nn.Conv2d(dim, dim, 3, 1, 1, bias=bias)
        self.dropout = nn.Dropout(0.5)
        self.activation = nn.LeakyReLU(0.2) if leaky else nn.ReLU()
        self.normalization_layer = nn.InstanceNorm2d(dim)

    def forward(self, x):
        return x + self.dropout(self.activation(self.normalization_layer(self.conv_layer(x))))


def _upsample_stage(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list:
    """Transposed conv, IN, ReLU, two ResBlocks: five nn.Sequential positions."""
    return [nn.ConvTranspose2d(cin, cout, kernel, stride, padding, 0, bias=False),
            nn.InstanceNorm2d(cout), nn.ReLU(),
            ResnetBlock(cout, bias=False, leaky=False), ResnetBlock(cout, bias=False, leaky=False)]


class NetG(nn.Module):
    """G: (fc7, pool4, pool3) -> image in [0, 1]; the reference's _netG."""

    def __init__(self, ngf: int = 64):
        super().__init__()
        self.stage1_upsample = nn.Sequential(*_upsample_stage(4096, ngf * 4, 7, 1, 0),
                                             *_upsample_stage(ngf * 4, ngf * 8, 3, 2, 1))
        self.stage2_upsample = nn.Sequential(*_upsample_stage(512 + ngf * 8, ngf * 4, 3, 2, 1))
        self.stage3_upsample = nn.Sequential(*_upsample_stage(256 + ngf * 4, ngf * 2, 5, 2, 2),
                                             *_upsample_stage(ngf * 2, ngf, 5, 2, 2))
        self.stage4_upsample = nn.Sequential(nn.ConvTranspose2d(ngf, 3, 8, 2, 100), nn.Sigmoid())

    def forward(self, fc7, pool4, pool3):
        h = self.stage1_upsample(fc7)
        h = self.stage2_upsample(torch.cat((h, pool4), 1))
        h = self.stage3_upsample(torch.cat((h, pool3), 1))
        return self.stage4_upsample(h)


class NetD(nn.Module):
    """D: image in [0, 1] -> (out_s, out_c); the reference's _netD."""

    def __init__(self, n_class: int = 19, ndf: int = 64):
        super().__init__()
        d = 2 * ndf
        blocks = lambda: [ResnetBlock(d, bias=True, leaky=True) for _ in range(3)]  # noqa: E731
        self.feature = nn.Sequential(
            nn.Conv2d(3, d, 4, 2, 2), nn.InstanceNorm2d(d), nn.LeakyReLU(0.2),
            *blocks(), nn.MaxPool2d(2, 2), *blocks(), nn.MaxPool2d(2, 2), *blocks())
        self.out_s = nn.Sequential(nn.Conv2d(d, 4, 3, padding=1))
        self.out_c = nn.Sequential(nn.Conv2d(d, n_class, 3, padding=1))

    def forward(self, x):
        h = self.feature(x)
        return self.out_s(h), self.out_c(h)


def gan_init_(module: nn.Module) -> None:
    """The reference initialisation of G and D: kernels N(0, 0.02), biases U(-0.01, 0.01)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.01, 0.01)
