"""The DeepLab-v2 networks against PyTorch transcriptions written here from docs/methods.md
(section 6: ResNet-101 "DeeplabMulti"; section 1 item 7: VGG16 LargeFOV): parameter counts at
full width, outputs through the PyTorch-name importer in inference and in training mode, and
BatchNorm's running-statistics update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsd_jax import weights
from lsd_jax.models import deeplab
from lsd_jax.models.layers import scaled
from test_gradients import to_float64

torch = pytest.importorskip("torch")
tnn = torch.nn

# Many large programs: freed for the modules after this one (conftest.py).
pytestmark = pytest.mark.usefixtures("release_compiled_programs")

CLASSES = 19


# ------------------------------------------------------------------ the PyTorch transcriptions

class TorchBottleneck(tnn.Module):
    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = (tnn.Sequential(tnn.Conv2d(inplanes, planes * 4, 1, stride=stride,
                                                     bias=False), tnn.BatchNorm2d(planes * 4))
                           if downsample else None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchClassifier(tnn.Module):
    def __init__(self, inplanes, classes, branches=4):
        super().__init__()
        self.branches = branches
        self.conv2d_list = tnn.ModuleList(
            tnn.Conv2d(inplanes, classes, 3, padding=d, dilation=d, bias=True)
            for d in (6, 12, 18, 24))

    def forward(self, x):
        return sum(conv(x) for conv in list(self.conv2d_list)[:self.branches])


class TorchDeeplabMulti(tnn.Module):
    """layer5: the auxiliary classifier on layer3; layer6: the main one on layer4."""

    def __init__(self, classes, width=1.0, blocks=(3, 4, 23, 3), aux=False, branches=4):
        super().__init__()
        stem = scaled(64, width)
        self.conv1 = tnn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(stem)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = stem
        for stage, ((planes, stride, dilation), count) in enumerate(
                zip(((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)), blocks), 1):
            planes = scaled(planes, width)
            layers = []
            for j in range(count):
                layers.append(TorchBottleneck(inplanes, planes, stride if j == 0 else 1, dilation,
                                              downsample=j == 0))
                inplanes = planes * 4
            setattr(self, f"layer{stage}", tnn.Sequential(*layers))
        if aux:
            self.layer5 = TorchClassifier(scaled(256, width) * 4, classes, branches)
        self.layer6 = TorchClassifier(inplanes, classes, branches)
        self.aux = aux

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        layer3 = self.layer3(x)
        main = self.layer6(self.layer4(layer3))
        return (main, self.layer5(layer3)) if self.aux else (main,)


class TorchLargeFOV(tnn.Module):
    def __init__(self, classes, width=1.0, branches=4):
        super().__init__()
        layers, inplanes = [], 3
        for b, widths in enumerate(((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                    (512, 512, 512)), 1):
            d = 2 if b == 5 else 1
            for w in widths:
                layers += [tnn.Conv2d(inplanes, scaled(w, width), 3, padding=d, dilation=d),
                           tnn.ReLU()]
                inplanes = scaled(w, width)
            if b <= 3:
                layers.append(tnn.MaxPool2d(2, 2))
        fc = scaled(1024, width)
        layers += [tnn.Conv2d(inplanes, fc, 3, padding=4, dilation=4), tnn.ReLU(),
                   tnn.Conv2d(fc, fc, 3, padding=4, dilation=4), tnn.ReLU()]
        self.features = tnn.Sequential(*layers)
        self.classifier = TorchClassifier(fc, classes, branches)

    def forward(self, x):
        return (self.classifier(self.features(x)),)


# ------------------------------------------------------------------ helpers

def randomise_batch_norms(model, seed=0):
    """Statistics and affine parameters away from 1/0, so that every BN tensor matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)
    return model


def state_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def imported(module, torch_model, network, x):
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return weights.torch_to_flax(state_numpy(torch_model), shapes, network)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def relative_error(ours, reference):
    ours = np.transpose(np.asarray(ours, np.float64), (0, 3, 1, 2))
    reference = reference.detach().numpy().astype(np.float64)
    assert ours.shape == reference.shape
    return np.abs(ours - reference).max() / np.abs(reference).max()


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("aux, expected", [(False, 43_901_068), (True, 44_601_560)])
def test_resnet101_parameter_count_at_full_width(aux, expected):
    # ResNet-101 without its ImageNet fc: 42,500,160 (convolutions and BN affine); each ASPP
    # classifier: 4 x (C_in x 9 x 19 + 19), C_in = 2048 (main) or 1024 (auxiliary).
    module = deeplab.DeepLabV2ResNet(CLASSES, aux_classifier=aux)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 65, 65, 3)))
    reference = TorchDeeplabMulti(CLASSES, aux=aux)
    trained_in_reference = sum(p.numel() for p in reference.parameters())
    assert count(shapes["params"]) + count(shapes["frozen"]) == trained_in_reference == expected
    statistics = sum(b.numel() for name, b in reference.named_buffers()
                     if not name.endswith("num_batches_tracked"))
    assert count(shapes["batch_stats"]) == statistics


def test_largefov_parameter_count_at_full_width():
    # VGG16's 13 convolutions 14,714,688; fc6 512x9x1024 + 1024; fc7 1024x9x1024 + 1024;
    # the classifier 4 x (1024 x 9 x 19 + 19).
    module = deeplab.DeepLabV2VGG16(CLASSES)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 65, 65, 3)))
    reference = TorchLargeFOV(CLASSES)
    assert set(shapes) == {"params"}
    assert count(shapes["params"]) == sum(p.numel() for p in reference.parameters()) \
        == 29_573_004


@pytest.mark.parametrize("n", range(5, 14))
def test_stem_max_pool_is_pytorchs_ceil_mode(n):
    x = np.random.default_rng(n).standard_normal((1, n, n + 3, 2)).astype(np.float32)
    ours = deeplab.max_pool_3x3_ceil(jnp.asarray(x))
    reference = tnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)(nchw(x))
    assert relative_error(ours, reference) == 0.0


@pytest.mark.parametrize("aux, branches", [(True, 4), (False, 2)])
def test_resnet_outputs_match_the_transcription_in_inference(aux, branches):
    torch.manual_seed(0)
    reference = randomise_batch_norms(
        TorchDeeplabMulti(CLASSES, width=1 / 16, aux=aux, branches=branches)).eval()
    module = deeplab.DeepLabV2ResNet(CLASSES, width=1 / 16, aux_classifier=aux,
                                     aspp_branches=branches)
    x = np.random.default_rng(1).standard_normal((1, 321, 321, 3)).astype(np.float32)
    network = "deeplabv2_resnet101_multi" if aux else "deeplabv2_resnet101"
    variables = imported(module, reference, network, x)
    outputs = module.apply(variables, jnp.asarray(x), train=False)
    with torch.no_grad():
        expected = reference(nchw(x))
    assert outputs[0].shape == (1, 41, 41, CLASSES)  # output stride 8 with ceil-mode pooling
    assert relative_error(outputs[0], expected[0]) < 1e-4
    if aux:
        assert relative_error(outputs[3], expected[1]) < 1e-4
    # The export is the inverse of the import.
    back = weights.flax_to_torch(variables, network)
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.slow  # compiles whole networks' gradients
def test_resnet_training_mode_uses_and_updates_batch_statistics_as_pytorch():
    """The same computation as PyTorch's, checked in float64 where rounding cannot hide a
    difference; float32 is checked against float64 separately. (Through 100 layers that each
    normalise by the batch's statistics, float32 rounding reaches 2e-4 of the largest output,
    in PyTorch as here, and depends on the CPU's kernels: no cross-framework float32 bound holds
    on every machine.)"""
    torch.manual_seed(0)
    reference = randomise_batch_norms(
        TorchDeeplabMulti(CLASSES, width=1 / 16, aux=True)).train().double()
    module = deeplab.DeepLabV2ResNet(CLASSES, width=1 / 16, aux_classifier=True)
    x = np.random.default_rng(2).standard_normal((2, 97, 129, 3))
    network = "deeplabv2_resnet101_multi"
    variables = imported(module, reference, network, x.astype(np.float32))
    outputs32, _ = module.apply(variables, jnp.asarray(x, jnp.float32), train=True,
                                mutable=["batch_stats"])
    with jax.enable_x64(True):
        variables = to_float64(variables)
        outputs, updated = module.clone(dtype=jnp.float64).apply(
            variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        before = weights.flax_to_torch(variables, network)
        after = weights.flax_to_torch({**variables, **updated}, network)
    expected = reference(nchw(x))  # train mode: updates the running statistics in place
    assert relative_error(outputs[0], expected[0]) < 1e-9
    assert relative_error(outputs[3], expected[1]) < 1e-9
    assert relative_error(outputs32[0], expected[0]) < 1e-3
    assert relative_error(outputs32[3], expected[1]) < 1e-3
    statistics = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * (1 + 3 * 33 + 4)  # stem, 3 per block, 4 projections
    for key in statistics:
        assert not np.allclose(after[key], before[key]), f"{key} was not updated"
        # (the export is float32)
        np.testing.assert_allclose(after[key], reference.state_dict()[key].numpy(), rtol=1e-6,
                                   atol=1e-9, err_msg=key)


def test_frozen_statistics_ignore_the_batch():
    module = deeplab.DeepLabV2ResNet(CLASSES, width=1 / 16, blocks=(1, 1, 1, 1),
                                     bn_statistics="frozen")
    x = jax.random.normal(jax.random.key(0), (2, 65, 65, 3))
    # Compiled, as training and evaluation run them (op by op, they compile for seconds).
    variables = jax.jit(module.init)(jax.random.key(1), x)
    apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
    (train_score, *_), updated = apply(variables, x, train=True, mutable=("batch_stats",))
    np.testing.assert_array_equal(train_score, apply(variables, x, train=False)[0])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updated["batch_stats"],
                                     variables["batch_stats"]))
    with pytest.raises(ValueError, match="bn_statistics='moving'.*'batch', 'frozen'"):
        deeplab.DeepLabV2ResNet(CLASSES, width=1 / 16, bn_statistics="moving").init(
            jax.random.key(0), x)


def test_largefov_outputs_match_the_transcription():
    torch.manual_seed(0)
    reference = TorchLargeFOV(CLASSES, width=1 / 8).eval()
    module = deeplab.DeepLabV2VGG16(CLASSES, width=1 / 8)
    x = np.random.default_rng(3).standard_normal((1, 321, 321, 3)).astype(np.float32)
    variables = imported(module, reference, "deeplabv2_vgg16", x)
    score, fc7 = module.apply(variables, jnp.asarray(x))
    with torch.no_grad():
        (expected,) = reference(nchw(x))
    assert score.shape == (1, 40, 40, CLASSES) and fc7.shape[-1] == 128
    assert relative_error(score, expected) < 1e-4


def test_a_checkpoint_of_another_network_is_refused_by_name():
    reference = TorchLargeFOV(CLASSES, width=1 / 8)
    module = deeplab.DeepLabV2ResNet(CLASSES)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 65, 65, 3)))
    with pytest.raises(weights.WeightImportError,
                       match="does not match the reference names of DeepLab-v2 ResNet-101"):
        weights.torch_to_flax(state_numpy(reference), shapes, "deeplabv2_resnet101")


@pytest.mark.slow  # compiles whole networks' gradients
def test_resnet_gradients_compiled_equal_eager_and_float64():
    """The stem pool, BatchNorm in training mode and the aligned-corners upsampling inside a
    whole network: jit(grad) against eager grad and against float64."""
    from lsd_jax.models.layers import upsample_bilinear_align_corners
    from test_gradients import assert_close

    module = deeplab.DeepLabV2ResNet(CLASSES, width=1 / 16, blocks=(1, 1, 1, 1),
                                     aux_classifier=True)
    x = jax.random.normal(jax.random.key(0), (2, 65, 65, 3))
    variables = module.init(jax.random.key(1), x)

    def loss(params, variables, x):
        (score, _, _, aux), _ = module.clone(dtype=x.dtype).apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        up = upsample_bilinear_align_corners(score + aux, x.shape[1:3])
        return jnp.sum(jnp.sin(up))

    compiled = jax.jit(jax.grad(loss))(variables["params"], variables, x)
    eager = jax.grad(loss)(variables["params"], variables, x)
    assert_close(compiled, eager, "jit(grad) against eager grad")
    with jax.enable_x64(True):
        reference = jax.tree.map(np.asarray, jax.grad(loss)(
            *to_float64((variables["params"], variables, x))))
    assert_close(compiled, reference, "float32 against float64")
