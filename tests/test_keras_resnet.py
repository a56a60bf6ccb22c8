"""Importing Keras ImageNet ResNet weights (`weights.import_keras_resnet`) into the ImageNet
ResNet and DeepLab-v2 ResNet, and Keras VGG16's convolutions into DeepLab-v2 VGG16 LargeFOV.

The Keras files are written here with h5py, in the layouts Keras writes (legacy HDF5 with
keras.applications' names and with the older keras-applications ResNet50's, Keras 3
`.weights.h5` without recorded layer names), holding random ResNet-50 arrays. The imported
ImageNetResNet must give the features of a PyTorch float64 transcription of the Keras network
(keras.applications' ResNet50 definition: convs with bias, BatchNorm with the file's epsilon,
ZeroPadding2D + MaxPooling2D) fed the same arrays. Where Keras is installed, a file Keras itself
writes is checked against Keras' own outputs too. Images are 64x64, so the file runs in well
under a minute on two CPU cores.
"""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from configs import default
from lsd_jax import methods, preflight, programs, weights
from lsd_jax.errors import ConfigError
from lsd_jax.models.deeplab import DeepLabV2ResNet, DeepLabV2VGG16
from lsd_jax.models.resnet import FEATURE_NAMES, ImageNetResNet
from lsd_jax.weights import WeightImportError
from test_weights import flat, relative_error

TOLERANCE = 1e-4
RESNET50 = (3, 4, 6, 3)
RESNET101 = (3, 4, 23, 3)
SIZE = 64
NEW_EPSILON, OLD_EPSILON = 1.001e-5, 1e-3  # keras.applications', keras-applications'
BN_ARRAYS = ("gamma", "beta", "moving_mean", "moving_variance")

# keras.applications' ResNet50: stack1(x, filters, blocks, stride1) for conv2 ... conv5.
KERAS_STACKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def random_like(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


# ------------------------------------------------------------------------------------------------
# Keras ResNet50, as keras.applications defines it
# ------------------------------------------------------------------------------------------------

def keras_resnet50_layers():
    """(name, "conv"/"bn", kernel shape or channels) of every weighted layer, in the model's
    order: Keras lists a functional model's layers by depth, so a stage's first block has its
    shortcut conv (`_0_conv`) after `_2_conv`/`_2_bn` and before `_3_conv`, and `_0_bn`
    before `_3_bn` (Add takes [shortcut, x])."""
    layers = [("conv1_conv", "conv", (7, 7, 3, 64)), ("conv1_bn", "bn", 64)]
    channels = 64
    for stage, (filters, blocks, _) in enumerate(KERAS_STACKS, 2):
        for b in range(1, blocks + 1):
            name = f"conv{stage}_block{b}"
            convs = {1: (1, 1, channels, filters), 2: (3, 3, filters, filters),
                     3: (1, 1, filters, 4 * filters), 0: (1, 1, channels, 4 * filters)}
            order = ((1, "conv"), (1, "bn"), (2, "conv"), (2, "bn")) + (
                ((0, "conv"), (3, "conv"), (0, "bn"), (3, "bn")) if b == 1
                else ((3, "conv"), (3, "bn")))
            for k, kind in order:
                layers.append((f"{name}_{k}_{kind}", kind,
                               convs[k] if kind == "conv" else convs[k][-1]))
            channels = 4 * filters
    return layers


def random_keras_resnet50(seed):
    """Keras layer name -> its arrays (conv: kernel, bias; BN: gamma, beta, moving mean,
    moving variance), random: He-normal kernels, every bias and statistic clearly nonzero."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, kind, shape in keras_resnet50_layers():
        if kind == "conv":
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            arrays[name] = [(rng.standard_normal(shape) * std).astype(np.float32),
                            rng.normal(0.0, 0.5, shape[-1:]).astype(np.float32)]
        else:
            arrays[name] = [rng.uniform(0.5, 1.5, shape).astype(np.float32),
                            rng.normal(0.0, 0.5, shape).astype(np.float32),
                            rng.normal(0.0, 0.5, shape).astype(np.float32),
                            rng.uniform(0.5, 2.0, shape).astype(np.float32)]
    return arrays


def keras_features(arrays, x, epsilon):
    """keras.applications' ResNet50 transcribed in PyTorch (float64, NCHW): its conv1 after
    BN and ReLU and its conv{2-5}_block{last}_out, as NHWC numpy."""
    w = {name: [torch.from_numpy(a.astype(np.float64)) for a in value]
         for name, value in arrays.items()}

    def conv(x, name, stride=1, padding=0):
        kernel, bias = w[name]
        return F.conv2d(x, kernel.permute(3, 2, 0, 1), bias, stride=stride, padding=padding)

    def bn(x, name):
        gamma, beta, mean, var = w[name]
        return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=epsilon)

    x = torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
    x = F.pad(x, (3, 3, 3, 3))  # ZeroPadding2D(3), then the 7x7/2 conv "valid"
    x = F.relu(bn(conv(x, "conv1_conv", stride=2), "conv1_bn"))
    features = {"conv1": x}
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)  # ZeroPadding2D(1) + MaxPool 3/2
    for stage, (filters, blocks, stride1) in enumerate(KERAS_STACKS, 2):
        for b in range(1, blocks + 1):
            name, stride = f"conv{stage}_block{b}", stride1 if b == 1 else 1
            shortcut = bn(conv(x, f"{name}_0_conv", stride), f"{name}_0_bn") if b == 1 else x
            y = F.relu(bn(conv(x, f"{name}_1_conv", stride), f"{name}_1_bn"))
            y = F.relu(bn(conv(y, f"{name}_2_conv", padding=1), f"{name}_2_bn"))  # "same"
            y = bn(conv(y, f"{name}_3_conv"), f"{name}_3_bn")
            x = F.relu(shortcut + y)
        features[f"res{stage}"] = x
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in features.items()}


def letter_name(name):
    """The older keras-applications ResNet50's name of a keras.applications layer."""
    if name.startswith("conv1_"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn_conv1"}[name]
    stage, block, k, kind = name[4], int(name.split("_block")[1].split("_")[0]), \
        int(name.split("_")[2]), name.split("_")[3]
    branch = "1" if k == 0 else "2" + "abc"[k - 1]
    return f"{'res' if kind == 'conv' else 'bn'}{stage}{'abcdefghijklmnopqrstuvw'[block - 1]}" \
           f"_branch{branch}"


def top_layers(rng, letters):
    """Extra layers a file has around the ResNet: weightless ones and the (small) top."""
    dense = [rng.standard_normal((2048, 10)).astype(np.float32), np.zeros(10, np.float32)]
    return {"conv1_pad": [], "pool1_pool": [], ("fc1000" if letters else "predictions"): dense}


def write_legacy_h5(path, arrays, letters=False):
    """Legacy HDF5 (Keras 1/2 `save_weights`): `layer_names`, a group per layer whose
    `weight_names` lists its arrays: Keras 2's `conv1_conv/kernel:0`, or with `letters` the
    Keras 1 names of resnet50_weights_tf_dim_ordering_tf_kernels.h5 (`conv1_W:0`,
    `bn_conv1_running_std:0`, which held the variance)."""
    layers = dict(top_layers(np.random.default_rng(1), letters))
    layers.update({letter_name(k) if letters else k: v for k, v in arrays.items()})
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name in layers])
        f.attrs["backend"] = b"tensorflow"
        for layer, values in layers.items():
            group = f.create_group(layer)
            if len(values) == 4:
                kinds = (("gamma", "beta", "running_mean", "running_std") if letters
                         else BN_ARRAYS)
            else:
                kinds = (("W", "b") if letters else ("kernel", "bias"))[:len(values)]
            names = [f"{layer}_{kind}:0" if letters else f"{layer}/{kind}:0" for kind in kinds]
            group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for name, array in zip(names, values):
                group.create_dataset(name, data=array)
    return str(path)


def write_keras3_h5(path, arrays, order):
    """Keras 3 `save_weights("x.weights.h5")`: `layers/<class>_<n>/vars/<i>`, groups named by
    class and position in model order, no layer names recorded (as before Keras recorded
    them)."""
    keys = {}
    with h5py.File(path, "w") as f:
        layers = f.create_group("layers")
        f.create_group("vars")
        layers.create_group("input_layer").create_group("vars")
        for name, kind in order:
            key = "conv2d" if kind == "conv" else "batch_normalization"
            count = keys.get(key, -1) + 1
            keys[key] = count
            stored = layers.create_group(f"{key}_{count}" if count else key).create_group("vars")
            for i, array in enumerate(arrays[name]):
                stored.create_dataset(str(i), data=array)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_arrays():
    return random_keras_resnet50(0)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).normal(0.0, 50.0, (1, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet50_shapes(image):
    return jax.eval_shape(ImageNetResNet(blocks=RESNET50).init, jax.random.key(0), image)


@pytest.fixture(scope="module")
def legacy_file(keras_arrays, tmp_path_factory):
    return write_legacy_h5(tmp_path_factory.mktemp("keras") / "resnet50.h5", keras_arrays)


@pytest.fixture(scope="module")
def imported_new(legacy_file, resnet50_shapes):
    return weights.import_keras_resnet(legacy_file, resnet50_shapes)


@jax.jit
def run_resnet(variables, x):
    return ImageNetResNet(blocks=RESNET50).apply(variables, x)


def assert_features_match(variables, arrays, image, epsilon):
    ours = run_resnet(variables, image)
    theirs = keras_features(arrays, image, epsilon)
    assert set(ours) == set(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        error = relative_error(ours[name], theirs[name])
        assert error < TOLERANCE, (name, error)


# ------------------------------------------------------------------------------------------------
# ImageNetResNet against the Keras network
# ------------------------------------------------------------------------------------------------

def test_resnet50_has_keras_value_count(resnet50_shapes):
    """Our ResNet-50 holds Keras ResNet50-notop's 23,587,712 values less its conv biases."""
    ours = sum(np.prod(s.shape) for s in jax.tree.leaves(resnet50_shapes))
    biases = sum(shape[-1] for _, kind, shape in keras_resnet50_layers() if kind == "conv")
    assert (ours, biases) == (23_587_712 - 26_560, 26_560)


def test_legacy_file_with_keras_applications_names_gives_keras_features(imported_new,
                                                                        keras_arrays, image):
    assert_features_match(imported_new, keras_arrays, image, NEW_EPSILON)


def test_legacy_file_with_res2a_names_gives_keras_features(keras_arrays, resnet50_shapes, image,
                                                           tmp_path):
    path = write_legacy_h5(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                           keras_arrays, letters=True)
    variables = weights.import_keras_resnet(path, resnet50_shapes)
    assert_features_match(variables, keras_arrays, image, OLD_EPSILON)


def test_keras3_file_without_names_imports_the_same(keras_arrays, resnet50_shapes, imported_new,
                                                    tmp_path):
    order = [(name, kind) for name, kind, _ in keras_resnet50_layers()]
    path = write_keras3_h5(tmp_path / "resnet50.weights.h5", keras_arrays, order)
    variables = weights.import_keras_resnet(path, resnet50_shapes)
    a, b = flat(variables), flat(imported_new)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), "/".join(key))


def test_file_written_by_keras_gives_keras_outputs(image, resnet50_shapes, tmp_path):
    """keras.applications.ResNet50 itself: its Keras 3 `.weights.h5` (layer names removed, as
    older Keras 3 wrote it) and its legacy `.h5` give Keras' own features."""
    keras = pytest.importorskip("keras")
    model = keras.applications.ResNet50(weights=None, include_top=False,
                                        input_shape=(SIZE, SIZE, 3))
    arrays = random_keras_resnet50(2)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(arrays[layer.name])
    outputs = ["conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
               "conv5_block3_out"]
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in outputs])
    theirs = dict(zip(FEATURE_NAMES, (np.asarray(a) for a in probe([image], training=False))))

    model.save_weights(tmp_path / "resnet50.weights.h5")
    with h5py.File(tmp_path / "resnet50.weights.h5", "r+") as f:
        for group in f["layers"].values():
            if "vars" in group and "name" in group["vars"].attrs:
                del group["vars"].attrs["name"]
    model.save(tmp_path / "resnet50.h5")
    for path in ("resnet50.weights.h5", "resnet50.h5"):
        variables = weights.import_keras_resnet(tmp_path / path, resnet50_shapes)
        ours = run_resnet(variables, image)
        for name in FEATURE_NAMES:
            error = relative_error(ours[name], theirs[name])
            assert error < TOLERANCE, (path, name, error)


# ------------------------------------------------------------------------------------------------
# DeepLab-v2 ResNet
# ------------------------------------------------------------------------------------------------

def test_deeplab_import_copies_kernels_folds_biases_and_keeps_the_classifiers(
        legacy_file, keras_arrays):
    model = DeepLabV2ResNet(num_classes=3, blocks=RESNET50, aux_classifier=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
    before = flat(random_like(shapes, 3))
    after = flat(weights.import_keras_resnet(legacy_file, traverse_util.unflatten_dict(before)))
    assert after.keys() == before.keys()

    def ours(stage, j, k):
        if stage == 1:
            return "conv1", "bn1"
        block = f"layer{stage - 1}_{j - 1}"
        return ((f"{block}/downsample_conv", f"{block}/downsample_bn") if k == 0
                else (f"{block}/conv{k}", f"{block}/bn{k}"))

    checked = set()
    for name, kind, _ in keras_resnet50_layers():
        if kind != "conv":
            continue
        parts = name.split("_")
        stage, j, k = ((1, 0, 0) if name == "conv1_conv" else
                       (int(parts[0][4:]), int(parts[1][5:]), int(parts[2])))
        conv, bn = ours(stage, j, k)
        kernel, bias = keras_arrays[name]
        gamma, beta, mean, var = keras_arrays[name[:-len("conv")] + "bn"]
        expected = {("params", *conv.split("/"), "kernel"): kernel,
                    ("frozen", *bn.split("/"), "scale"): gamma,
                    ("frozen", *bn.split("/"), "bias"): beta,
                    ("batch_stats", *bn.split("/"), "mean"):
                        np.float32(np.float64(mean) - np.float64(bias)),
                    ("batch_stats", *bn.split("/"), "var"):
                        np.float32(np.float64(var) + (NEW_EPSILON - 1e-5))}
        for path, value in expected.items():
            np.testing.assert_array_equal(np.asarray(after[path]), value, "/".join(path))
        checked |= set(expected)
    untouched = set(before) - checked
    assert untouched and all(path[1].startswith("classifier") for path in untouched)
    for path in untouched:
        np.testing.assert_array_equal(np.asarray(after[path]), before[path])


def test_resnet50_file_into_resnet101_is_explained(legacy_file, keras_arrays, tmp_path):
    model = DeepLabV2ResNet(num_classes=3, blocks=RESNET101)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
    with pytest.raises(WeightImportError, match=r"resnet50\.h5 does not fit the variables' "
                       r"ResNet-101 .*no layer 'conv4_block7_1_conv'.*appears to be a ResNet-50"):
        weights.import_keras_resnet(legacy_file, shapes)
    # A Keras 3 file without names: its groups are named in ResNet-101's order, and its
    # number of convolutions still tells its depth.
    order = [(name, kind) for name, kind, _ in keras_resnet50_layers()]
    path = write_keras3_h5(tmp_path / "resnet50.weights.h5", keras_arrays, order)
    with pytest.raises(WeightImportError, match=r"53 convolutions where ResNet-101 .* has 104: "
                                                r"it appears to be a ResNet-50"):
        weights.import_keras_resnet(path, shapes)


def test_wrong_width_and_wrong_files_are_explained(legacy_file, image, tmp_path):
    shapes = jax.eval_shape(ImageNetResNet(width=0.5).init, jax.random.key(0), image)
    with pytest.raises(WeightImportError, match=r"resnet50\.h5: layer 'conv1_conv' has shape "
                                                r"\(7, 7, 3, 64\) .* \(7, 7, 3, 32\).*width=1\.0"):
        weights.import_keras_resnet(legacy_file, shapes)
    vgg = write_legacy_h5(tmp_path / "vgg.h5", {"block1_conv1": [np.zeros((3, 3, 3, 4),
                                                                          np.float32)]})
    with pytest.raises(WeightImportError, match=r"vgg\.h5: not a Keras ResNet"):
        weights.import_keras_resnet(vgg, jax.eval_shape(ImageNetResNet().init,
                                                        jax.random.key(0), image))


# ------------------------------------------------------------------------------------------------
# DeepLab-v2 VGG16 LargeFOV from Keras VGG16
# ------------------------------------------------------------------------------------------------

VGG_CONVS = [(f"block{b}_conv{i}", f"conv{b}_{i}", shape)
             for b, widths in enumerate(((3, 64, 64), (64, 128, 128), (128, 256, 256, 256),
                                         (256, 512, 512, 512), (512, 512, 512, 512)), 1)
             for i, shape in enumerate(zip(widths[:-1], widths[1:]), 1)]


@pytest.mark.parametrize("top", [True, False])
def test_largefov_takes_vgg16_convolutions_and_keeps_fc6_fc7(top, tmp_path):
    rng = np.random.default_rng(4)
    arrays = {keras: [rng.standard_normal((3, 3, *shape)).astype(np.float32),
                      rng.standard_normal(shape[1:]).astype(np.float32)]
              for keras, _, shape in VGG_CONVS}
    if top:  # at reduced width: with fully_connected=False the top is not read
        arrays.update({"fc1": [np.zeros((7 * 7 * 512, 8), np.float32), np.zeros(8, np.float32)],
                       "fc2": [np.zeros((8, 8), np.float32), np.zeros(8, np.float32)]})
    path = write_legacy_h5(tmp_path / "vgg16.h5", arrays)
    shapes = jax.eval_shape(DeepLabV2VGG16(num_classes=3).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))
    before = flat(random_like(shapes, 5))
    after = flat(weights.import_keras_vgg16(path, traverse_util.unflatten_dict(before),
                                            fully_connected=False))
    assert after.keys() == before.keys()
    for keras, ours, _ in VGG_CONVS:
        for i, kind in enumerate(("kernel", "bias")):
            np.testing.assert_array_equal(np.asarray(after[("params", ours, kind)]),
                                          arrays[keras][i])
    for path in before:
        if not path[1].startswith("conv"):  # fc6, fc7, the classifier
            np.testing.assert_array_equal(np.asarray(after[path]), before[path])


# ------------------------------------------------------------------------------------------------
# config.init
# ------------------------------------------------------------------------------------------------

def small_config(backbone, **init):
    config = default.apply_variant(default.get_config(), "source_only")
    config.model.backbone = backbone
    config.model.resnet_blocks = RESNET50
    config.init.update(init)
    return config


@pytest.mark.parametrize("backbone, field", [("fcn8s_vgg16", "resnet_weights"),
                                             ("deeplabv2_vgg16", "resnet_weights"),
                                             ("deeplabv2_resnet101", "vgg16_weights")])
def test_keras_weights_for_another_backbone_are_refused(backbone, field):
    config = small_config(backbone, **{field: "weights.h5"})
    with pytest.raises(ConfigError, match=rf"config\.init\.{field}='weights\.h5' .*"
                                          rf"config\.model\.backbone='{backbone}'"):
        preflight.check_config(config)  # before anything is written or compiled
    with pytest.raises(ConfigError, match=rf"config\.init\.{field}"):
        programs._import_weights(config, None, {})


def test_resnet_weights_start_a_deeplab_run(legacy_file, keras_arrays):
    config = small_config("deeplabv2_resnet101", resnet_weights=legacy_file)
    method = methods.build(config)
    states = jax.eval_shape(method.init, jax.random.key(0))
    f = programs._import_weights(config, method, states)["f"]
    np.testing.assert_array_equal(np.asarray(f.params["layer4_2"]["conv3"]["kernel"]),
                                  keras_arrays["conv5_block3_3_conv"][0])
    np.testing.assert_array_equal(np.asarray(f.frozen["bn1"]["scale"]),
                                  keras_arrays["conv1_bn"][0])
    assert isinstance(f.params["classifier"]["conv0"]["kernel"], jax.ShapeDtypeStruct)
