"""Importing weights: Keras VGG16 files into F, PyTorch LSD-seg state_dicts into F, G and D.

Each import is checked by running the network: with imported weights our F, G and D must give
the activations of the Keras or PyTorch model the weights came from (float32, 1e-4 relative).
All networks are at full width, since that is what pretrained weights and reference checkpoints
are; images are kept small so the whole file runs in about a minute on two CPU cores.
"""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lsd_jax import weights
from lsd_jax.models import Discriminator, FCN8s, Generator
from lsd_jax.models.layers import bilinear_kernel, max_pool_ceil

TOLERANCE = 1e-4
NUM_CLASSES = 19


def relative_error(ours, theirs) -> float:
    """Largest absolute difference, relative to the largest magnitude of the reference."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def flat(variables):
    return traverse_util.flatten_dict(variables)


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]),
                                      err_msg="/".join(path))


def abstract_variables(model, *inputs):
    """The variable shapes of `model`, without computing any initial values."""
    return jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs, train=False), *inputs)


# ------------------------------------------------------------------------------------------------
# Keras VGG16
# ------------------------------------------------------------------------------------------------
#
# F pads conv1_1 by 100, Keras' VGG16 by 1 ("same"). Giving Keras our image with a border of 99
# zeros therefore makes both networks see exactly the same zero-padded input, so conv1_1 and
# everything after it are the same computation, not just the same weights. With a 26x26 image
# Keras sees 224x224 (the size its top requires) and every pool input has an even size, so
# F's ceil-mode pools and Keras' floor-mode pools agree: F's pool3/pool4/pool5 must equal
# Keras' block3/4/5_pool, and F's fc7 (1x1 here) Keras' fc2.
KERAS_BORDER = 99


def keras_input(x):
    b = KERAS_BORDER
    return np.pad(x, ((0, 0), (b, b), (b, b), (0, 0)))


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def randomize_keras(model, seed):
    """He-normal kernels and clearly nonzero biases, so every weight and bias matters (Keras'
    own init has zero biases and lets activations fade through 16 layers)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            std = np.sqrt(2.0 / np.prod(kernel.shape[:-1]))
            layer.set_weights([rng.standard_normal(kernel.shape, np.float32) * np.float32(std),
                               rng.normal(0.0, 0.5, bias.shape).astype(np.float32)])
    return model


def keras_activations(keras, model, layer_names, x):
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in layer_names])
    return [np.asarray(a) for a in probe([keras_input(x)], training=False)]


@jax.jit
def run_f(variables, x):
    """F's (fc7, pool5, pool4, pool3) in inference mode; pool5 from conv5_3's captured output."""
    (_, fc7, pool4, pool3), state = FCN8s(num_classes=NUM_CLASSES).apply(
        variables, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda module, _: module.name == "conv5_3")
    conv5_3 = state["intermediates"]["conv5_3"]["__call__"][0]
    return fc7, max_pool_ceil(jax.nn.relu(conv5_3)), pool4, pool3


def write_legacy_h5(model, path, weight_name, skip=()):
    """The legacy HDF5 weights layout of Keras 1/2 `save_weights`, written with h5py: a
    `layer_names` attribute and a group per layer whose `weight_names` lists its datasets.
    `weight_name(layer, kind)` spells each array's name the way that Keras version did."""
    layers = [layer for layer in model.layers if layer.name not in skip]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = f.create_group(layer.name)
            names = [weight_name(layer.name, kind) for kind in ("kernel", "bias")
                     ] if layer.weights else []
            group.attrs["weight_names"] = (np.array([n.encode() for n in names]) if names
                                           else np.asarray(names))
            for name, array in zip(names, layer.get_weights()):
                group.create_dataset(name, data=array)


def keras2_name(layer, kind):
    return f"{layer}/{kind}:0"


def keras1_name(layer, kind):  # as in vgg16_weights_tf_dim_ordering_tf_kernels*.h5
    return f"{layer}_{'W' if kind == 'kernel' else 'b'}_1:0"


@pytest.fixture(scope="module")
def f_variables():
    """A full-width F's variables, the template every Keras import starts from.

    Random values in F's shapes stand in for `FCN8s.init`, whose normal fill of 134M parameters
    takes about 10 s on two CPU cores; any values do, since the import must replace some
    entries and keep the others bit for bit.
    """
    rng = np.random.default_rng(0)
    shapes = abstract_variables(FCN8s(num_classes=NUM_CLASSES), jnp.zeros((1, 26, 26, 3)))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


@pytest.fixture(scope="module")
def keras_vgg16_top(keras, tmp_path_factory):
    model = randomize_keras(keras.applications.VGG16(weights=None, include_top=True), seed=1)
    path = tmp_path_factory.mktemp("vgg16_top") / "vgg16.weights.h5"
    model.save_weights(path)
    return model, path


@pytest.fixture(scope="module")
def keras_vgg16_notop(keras, tmp_path_factory):
    model = randomize_keras(
        keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3)),
        seed=2)
    path = tmp_path_factory.mktemp("vgg16_notop") / "vgg16_notop.h5"
    model.save(path)  # the legacy full-model HDF5 file: weights under "model_weights"
    return model, path


@pytest.fixture(scope="module")
def imported_top(keras_vgg16_top, f_variables):
    return weights.import_keras_vgg16(keras_vgg16_top[1], f_variables)


@pytest.fixture(scope="module")
def imported_notop(keras_vgg16_notop, f_variables):
    return weights.import_keras_vgg16(keras_vgg16_notop[1], f_variables)


def assert_only_backbone_changed(imported, initial, with_top):
    """conv1_1..conv5_3 (and fc6/fc7 from a top) replaced; score layers and frozen kept."""
    replaced = {ours for _, ours in weights.VGG16_KERAS_CONVS}
    replaced |= {"fc6", "fc7"} if with_top else set()
    for path, value in flat(imported).items():
        changed = not np.array_equal(np.asarray(value), np.asarray(flat(initial)[path]))
        assert changed == (path[0] == "params" and path[1] in replaced), path


@pytest.mark.slow  # full-width VGG16 / FCN-8s files
def test_keras_vgg16_with_top_reproduces_keras_activations(keras, keras_vgg16_top, imported_top,
                                                           f_variables):
    model, _ = keras_vgg16_top
    x = np.random.default_rng(3).standard_normal((1, 26, 26, 3)).astype(np.float32)
    fc7, pool5, pool4, pool3 = run_f(imported_top, x)
    fc2, block5, block4, block3 = keras_activations(
        keras, model, ["fc2", "block5_pool", "block4_pool", "block3_pool"], x)
    assert fc7.shape == (1, 1, 1, 4096)
    assert relative_error(fc7.reshape(1, 4096), fc2) < TOLERANCE
    assert relative_error(pool5, block5) < TOLERANCE
    assert relative_error(pool4, block4) < TOLERANCE
    assert relative_error(pool3, block3) < TOLERANCE
    assert_only_backbone_changed(imported_top, f_variables, with_top=True)


def test_keras_vgg16_without_top_reproduces_keras_activations(keras, keras_vgg16_notop,
                                                              imported_notop, f_variables):
    model, _ = keras_vgg16_notop
    x = np.random.default_rng(4).standard_normal((1, 26, 58, 3)).astype(np.float32)  # 224x256
    _, pool5, pool4, pool3 = run_f(imported_notop, x)
    block5, block4, block3 = keras_activations(
        keras, model, ["block5_pool", "block4_pool", "block3_pool"], x)
    assert pool5.shape == (1, 7, 8, 512)
    assert relative_error(pool5, block5) < TOLERANCE
    assert relative_error(pool4, block4) < TOLERANCE
    assert relative_error(pool3, block3) < TOLERANCE
    assert_only_backbone_changed(imported_notop, f_variables, with_top=False)


@pytest.mark.slow  # full-width VGG16 / FCN-8s files
def test_keras_vgg16_with_top_legacy_keras2_file_imports_the_same(keras_vgg16_top, imported_top,
                                                                  f_variables, tmp_path):
    path = tmp_path / "vgg16_keras2.h5"
    write_legacy_h5(keras_vgg16_top[0], path, keras2_name)
    assert_trees_equal(weights.import_keras_vgg16(path, f_variables), imported_top)


def _strip_recorded_layer_names(path):
    """A Keras 3 weights file as versions before 3.x wrote it: no layer name next to the arrays."""
    with h5py.File(path, "r+") as f:
        for group in f["layers"].values():
            group["vars"].attrs.pop("name", None)


@pytest.mark.parametrize("layout", ["keras3_weights", "keras3_weights_unnamed", "keras3_archive",
                                    "keras2_h5", "keras1_h5"])
def test_keras_vgg16_every_file_layout_imports_the_same(layout, keras_vgg16_notop, imported_notop,
                                                        f_variables, tmp_path):
    model, _ = keras_vgg16_notop
    if layout.startswith("keras3_weights"):
        path = tmp_path / "vgg16.weights.h5"
        model.save_weights(path)
        if layout == "keras3_weights_unnamed":
            _strip_recorded_layer_names(path)
    elif layout == "keras3_archive":
        path = tmp_path / "vgg16.keras"
        model.save(path)
    else:
        path = tmp_path / "vgg16.h5"
        write_legacy_h5(model, path, keras2_name if layout == "keras2_h5" else keras1_name)
    assert_trees_equal(weights.import_keras_vgg16(path, f_variables), imported_notop)


def test_keras_import_names_the_file_and_layer_on_errors(keras_vgg16_notop, tmp_path):
    model, saved = keras_vgg16_notop
    path = tmp_path / "incomplete.h5"
    write_legacy_h5(model, path, keras2_name, skip={"block3_conv2"})
    with pytest.raises(weights.WeightImportError, match=r"incomplete\.h5.*'block3_conv2'"):
        weights.import_keras_vgg16(path, abstract_variables(FCN8s(), jnp.zeros((1, 64, 64, 3))))

    narrow = abstract_variables(FCN8s(width=0.5), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(weights.WeightImportError,
                       match=r"vgg16_notop\.h5.*'block1_conv1'.*\(3, 3, 3, 64\).*"
                             r"\(3, 3, 3, 32\).*width=1\.0"):
        weights.import_keras_vgg16(saved, narrow)

    not_keras = tmp_path / "other.h5"
    with h5py.File(not_keras, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(weights.WeightImportError, match=r"other\.h5.*not a Keras weights file"):
        weights.read_keras_weights(not_keras)


# ------------------------------------------------------------------------------------------------
# PyTorch LSD-seg
# ------------------------------------------------------------------------------------------------
#
# The torch transcription is built with random weights, saved the ways checkpoints come (raw, in
# a trainer's checkpoint dict, with DataParallel's prefix), imported, and both networks run on
# the same input in inference mode. 192x320 is the smallest convenient size at which G's skip
# connections line up (multiples of 32).
HEIGHT, WIDTH = 192, 320


@pytest.fixture(scope="module")
def torch_ref():
    pytest.importorskip("torch")
    try:  # tests/ on sys.path (pytest's default for a test directory without __init__.py)
        import torch_reference
    except ImportError:  # tests/ as a package
        from tests import torch_reference
    return torch_reference


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def torch_f(torch, torch_ref, tmp_path_factory):
    """Reference F with He-normal kernels, nonzero biases and nonzero score layers; the
    upsamplers keep their bilinear kernels. Saved as LSD-seg's trainer does."""
    torch.manual_seed(0)
    net = torch_ref.FCN8sLSD(NUM_CLASSES).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.normal_(module.bias, 0.0, 0.5)
    path = tmp_path_factory.mktemp("torch") / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "iteration": 1000, "arch": "FCN8s_LSD",
                "model_state_dict": net.state_dict(), "best_mean_iu": 0.25}, path)
    return net, path


@pytest.fixture(scope="module")
def torch_g(torch, torch_ref, tmp_path_factory):
    torch.manual_seed(1)
    net = torch_ref.NetG().eval()
    torch_ref.gan_init_(net)
    path = tmp_path_factory.mktemp("torch") / "netG.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def torch_d(torch, torch_ref, tmp_path_factory):
    torch.manual_seed(2)
    net = torch_ref.NetD(NUM_CLASSES).eval()
    torch_ref.gan_init_(net)
    path = tmp_path_factory.mktemp("torch") / "netD.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net, path


def g_inputs(rng):
    """(fc7, pool4, pool3) as F gives them for a 192x320 image: non-negative, NHWC."""
    shapes = [(1, 7, 11, 4096), (1, 25, 33, 512), (1, 49, 65, 256)]
    return [rng.uniform(0.0, 2.0, s).astype(np.float32) for s in shapes]


def logit(p):
    """Undo G's sigmoid: compares what G computes, not values squashed near 0.5."""
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.mark.slow  # full-width VGG16 / FCN-8s files
def test_torch_fcn8s_import_reproduces_all_four_outputs(torch, torch_f):
    net, path = torch_f
    x = np.random.default_rng(5).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    template = abstract_variables(FCN8s(num_classes=NUM_CLASSES), jnp.zeros((1, HEIGHT, WIDTH, 3)))
    variables = weights.import_torch_fcn8s(path, template)
    ours = jax.jit(lambda v, x: FCN8s(num_classes=NUM_CLASSES).apply(v, x, train=False))(
        variables, x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(nchw(x)))
    for name, a, b in zip(["score", "fc7", "pool4", "pool3"], ours, theirs):
        assert a.shape == nhwc(b).shape, name
        assert relative_error(a, nhwc(b)) < TOLERANCE, name
    # The checkpoint's bilinear kernels arrive as ours: same values, our layout.
    for name, size, _ in [("upscore2", 4, 2), ("upscore_pool4", 4, 2), ("upscore8", 16, 8)]:
        np.testing.assert_array_equal(variables["frozen"][name],
                                      bilinear_kernel(NUM_CLASSES, size))


def test_torch_generator_import_reproduces_the_image(torch, torch_g):
    net, path = torch_g
    fc7, pool4, pool3 = g_inputs(np.random.default_rng(6))
    variables = weights.import_torch_generator(path, abstract_variables(Generator(), fc7, pool4,
                                                                        pool3))
    ours = jax.jit(lambda v, *xs: Generator().apply(v, *xs, train=False))(variables, fc7, pool4,
                                                                          pool3)
    with torch.no_grad():
        theirs = nhwc(net(*(torch.from_numpy(nchw(t)) for t in (fc7, pool4, pool3))))
    assert ours.shape == theirs.shape == (1, HEIGHT, WIDTH, 3)
    assert relative_error(ours, theirs) < TOLERANCE
    assert relative_error(logit(ours), logit(theirs)) < TOLERANCE


def test_torch_discriminator_import_reproduces_both_heads(torch, torch_d):
    net, path = torch_d
    image = np.random.default_rng(7).uniform(size=(1, HEIGHT, WIDTH, 3)).astype(np.float32)
    variables = weights.import_torch_discriminator(
        path, abstract_variables(Discriminator(num_classes=NUM_CLASSES), image))
    out_s, out_c = jax.jit(lambda v, x: Discriminator(num_classes=NUM_CLASSES).apply(
        v, x, train=False))(variables, image)
    with torch.no_grad():
        ref_s, ref_c = net(torch.from_numpy(nchw(image)))
    assert out_s.shape == (1, 24, 40, 4) and out_c.shape == (1, 24, 40, NUM_CLASSES)
    assert relative_error(out_s, nhwc(ref_s)) < TOLERANCE
    assert relative_error(out_c, nhwc(ref_c)) < TOLERANCE


def network_template(network):
    if network == "F":
        return abstract_variables(FCN8s(num_classes=NUM_CLASSES), jnp.zeros((1, 64, 64, 3)))
    if network == "G":
        return abstract_variables(Generator(), *g_inputs(np.random.default_rng(0)))
    return abstract_variables(Discriminator(num_classes=NUM_CLASSES), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.slow  # full-width VGG16 / FCN-8s files
@pytest.mark.parametrize("network", ["F", "G", "D"])
def test_torch_export_round_trip(network, torch_f, torch_g, torch_d):
    net, _ = {"F": torch_f, "G": torch_g, "D": torch_d}[network]
    reference = {k: v.numpy() for k, v in net.state_dict().items()}
    variables = weights.torch_to_flax(reference, network_template(network), network)
    exported = weights.flax_to_torch(variables, network)
    assert list(exported) == list(reference)  # every key, in the reference's order
    for key, array in exported.items():
        np.testing.assert_array_equal(array, reference[key], err_msg=key)
    assert_trees_equal(weights.torch_to_flax(exported, variables, network), variables)


def test_torch_exported_state_dict_loads_into_pytorch(torch, torch_d, tmp_path):
    net, path = torch_d
    variables = weights.import_torch_discriminator(path, network_template("D"))
    out = tmp_path / "exported.pth"
    weights.save_torch_state_dict(variables, "D", out)
    fresh = type(net)(NUM_CLASSES)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.fixture(scope="module")
def d_state(torch_d):
    return {k: v.numpy() for k, v in torch_d[0].state_dict().items()}


@pytest.fixture(scope="module")
def d_template():
    return abstract_variables(Discriminator(num_classes=NUM_CLASSES), jnp.zeros((1, 64, 64, 3)))


def test_torch_import_lists_missing_and_unexpected_keys(d_state, d_template):
    state = dict(d_state)
    del state["feature.8.conv_layer.bias"]
    state["feature.8.conv_layer.scale"] = np.zeros(3, np.float32)
    with pytest.raises(weights.WeightImportError) as error:
        weights.torch_to_flax(state, d_template, "D", source="netD.pth")
    message = str(error.value)
    assert "netD.pth" in message and "D (Discriminator)" in message
    assert "missing keys (1): feature.8.conv_layer.bias" in message
    assert "unexpected keys (1): feature.8.conv_layer.scale" in message


def test_torch_import_names_key_and_shapes_on_mismatch(d_state, d_template):
    state = dict(d_state)
    state["out_c.0.weight"] = np.zeros((21, 128, 3, 3), np.float32)  # a 21-class checkpoint
    with pytest.raises(weights.WeightImportError,
                       match=r"out_c\.0\.weight: expected \(19, 128, 3, 3\), found "
                             r"\(21, 128, 3, 3\)"):
        weights.torch_to_flax(state, d_template, "D")


def test_torch_import_ignores_old_instance_norm_buffers(d_state, d_template):
    # PyTorch < 0.4 stored (unused) running statistics for InstanceNorm layers.
    state = dict(d_state)
    state["feature.1.running_mean"] = np.zeros(128, np.float32)
    state["feature.3.normalization_layer.running_var"] = np.ones(128, np.float32)
    assert_trees_equal(weights.torch_to_flax(state, d_template, "D"),
                       weights.torch_to_flax(d_state, d_template, "D"))


def test_torch_import_rejects_the_wrong_network(d_state):
    with pytest.raises(ValueError, match=r"not D \(Discriminator\)'s"):
        weights.torch_to_flax(d_state, network_template("G"), "D")


def test_torch_checkpoint_without_a_known_state_dict_entry_is_explained(torch, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"netD": {"feature.0.weight": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(weights.WeightImportError, match=r"odd\.pth.*\['netD', 'step'\].*key="):
        weights.load_torch_state_dict(path)
    assert list(weights.load_torch_state_dict(path, key="netD")) == ["feature.0.weight"]
