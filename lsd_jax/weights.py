"""Importers for pretrained weights: ImageNet VGG16 and ResNet from Keras, LSD-seg F/G/D and
the DeepLab-v2 networks from PyTorch.

Every importer takes the variables of one of our networks (from `model.init`, or shapes only
from `jax.eval_shape(model.init, ...)` when every variable gets replaced) and returns a new tree
of the same structure with the imported entries swapped in. Nothing is updated in place.

Keras VGG16 (`import_keras_vgg16`) reads, with h5py alone, every file layout Keras writes for it:
  - Keras 3 `model.save_weights("x.weights.h5")`: groups `layers/<class>_<n>/vars/<i>`;
  - Keras 3 `model.save("x.keras")`: a zip holding the same `model.weights.h5` and a config;
  - legacy HDF5, i.e. Keras 2 `save_weights("x.h5")` / `save("x.h5")` and Keras 3 `save("x.h5")`:
    a `layer_names` attribute and one group per layer whose `weight_names` attribute lists its
    arrays (`block1_conv1/kernel:0`, or `block1_conv1_W_1:0` in the widely distributed
    `vgg16_weights_tf_dim_ordering_tf_kernels(_notop).h5`).
Keras' VGG16 weights expect the same Caffe input as F (BGR, 0-255, mean subtracted; Keras'
mean differs from ours by less than 0.1 grey level), so they are copied without any change of
channel order. The same convolutions start DeepLab-v2 VGG16 LargeFOV
(`import_keras_vgg16(..., fully_connected=False)`), whose dilated 3x3 fc6/fc7 no VGG16 top fits.

Keras ResNet-50/101 (`import_keras_resnet`), from the same file layouts, fills the ImageNet
ResNet of `models.resnet` and the backbone of DeepLab-v2 ResNet (`models.deeplab`): both
naming schemes Keras has used (keras.applications' `conv2_block1_1_conv` and the older
keras-applications ResNet50's `res2a_branch2a`), each conv's bias and Keras' BatchNorm epsilon
folded exactly into the BatchNorm statistics, since our convolutions have no bias.

PyTorch LSD-seg state_dicts (`import_torch_fcn8s`, `import_torch_generator`,
`import_torch_discriminator`) use the reference parameter names of docs/methods.md, section 2.
The name correspondence is one table per network (`TORCH_NAMES`), read in both directions: the
exporter `flax_to_torch` writes our variables back under the reference names.
"""

import dataclasses
import io
import json
import logging
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Sequence

import h5py
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze

from lsd_jax.errors import UserError
from lsd_jax.models.deeplab import (ASPP_DILATIONS, LARGEFOV_BLOCKS, RESNET101_BLOCKS,
                                    TorchBatchNorm)
from lsd_jax.models.vgg_fcn import VGG_BLOCKS

logger = logging.getLogger(__name__)

Variables = Mapping[str, Any]
Path = tuple[str, ...]


class WeightImportError(UserError, ValueError):
    """A weight file does not fit the network it is imported into (a message complete without
    a traceback: `lsd_jax.main` prints it as one line)."""


# ------------------------------------------------------------------------------------------------
# Tree helpers
# ------------------------------------------------------------------------------------------------

def _flatten(variables: Variables) -> dict[Path, Any]:
    return traverse_util.flatten_dict(variables)


def _rebuild_like(variables: Variables, flat: Mapping[Path, Any]) -> Variables:
    """The nested tree of `flat`, frozen if the tree it replaces was frozen."""
    tree = traverse_util.unflatten_dict(dict(flat))
    return freeze(tree) if isinstance(variables, FrozenDict) else tree


def _as_leaf(array: np.ndarray, like: Any) -> Any:
    """An imported array as a leaf of the tree, in the dtype the template asks for."""
    return jnp.asarray(array, dtype=like.dtype)


def _path_str(path: Path) -> str:
    return "/".join(path)


def _with_keras_layers(variables: Variables, flat: Mapping[Path, Any],
                       updates: Mapping[Path, tuple[np.ndarray, str]], source: str, *,
                       network: str, expected: str) -> Variables:
    """`variables` with each path of `updates` ({path: (array, Keras layer name)}) replaced,
    every path present and every shape equal, or an error naming the file and the layer."""
    new = dict(flat)
    for path_, (array, keras_name) in updates.items():
        if path_ not in flat:
            raise WeightImportError(f"importing {source}: the variables have no "
                                    f"{_path_str(path_)}; pass {expected}")
        if array.shape != flat[path_].shape:
            raise WeightImportError(
                f"{source}: layer '{keras_name}' has shape {array.shape} where {network}'s "
                f"{_path_str(path_)} is {tuple(flat[path_].shape)}; ImageNet weights fit "
                f"{network} built with width=1.0")
        new[path_] = _as_leaf(array, flat[path_])
    return _rebuild_like(variables, new)


# ------------------------------------------------------------------------------------------------
# Keras VGG16
# ------------------------------------------------------------------------------------------------

# Keras layer name -> our F module name, in network order.
VGG16_KERAS_CONVS = tuple(
    (f"block{b}_conv{i}", f"conv{b}_{i}")
    for b, widths in enumerate(VGG_BLOCKS, 1) for i in range(1, len(widths) + 1))

# The fully connected layers of Keras' VGG16 top and the convolutions they become in F, with the
# spatial size of the convolution: fc1 reads the flattened 7x7x512 block5_pool.
VGG16_KERAS_FULLY_CONNECTED = (("fc1", "fc6", 7), ("fc2", "fc7", 1))

# Every weighted layer of `keras.applications.VGG16` as (class, name), in model order. Keras 3
# weight files name their groups by class and position (`conv2d_4`, `dense_1`); files from
# before Keras 3.x started to record each layer's name next to its arrays need this to recover it.
VGG16_KERAS_WEIGHTED_LAYERS = (
    tuple(("Conv2D", name) for name, _ in VGG16_KERAS_CONVS)
    + (("Dense", "fc1"), ("Dense", "fc2"), ("Dense", "predictions")))


def _snake_case(class_name: str) -> str:
    """Keras' class-name-to-key rule: `Conv2D` -> `conv2d`, `MaxPooling2D` -> `max_pooling2d`."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_group_names(layers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Keras 3 group key (`conv2d`, `conv2d_1`, ...) -> layer name, for layers in model order."""
    seen: dict[str, int] = {}
    names = {}
    for class_name, layer_name in layers:
        key = _snake_case(class_name)
        count = seen.get(key, -1) + 1
        seen[key] = count
        names[key if count == 0 else f"{key}_{count}"] = layer_name
    return names


def _decode_names(value: Any) -> list[str]:
    """An HDF5 name-list attribute (bytes or str, array or scalar) as a list of str."""
    if value is None:
        return []
    if isinstance(value, (bytes, str)):
        value = [value]
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in np.asarray(value).ravel()
            if isinstance(v, (bytes, str))]


def _hdf5_name_list(group: h5py.Group, attr: str) -> list[str] | None:
    """A name-list attribute, including Keras' split form (`layer_names0`, `layer_names1`, ...)
    used when the list is too long for one HDF5 attribute. None when absent."""
    if attr in group.attrs:
        return _decode_names(group.attrs[attr])
    if f"{attr}0" not in group.attrs:
        return None
    names, chunk = [], 0
    while f"{attr}{chunk}" in group.attrs:
        names += _decode_names(group.attrs[f"{attr}{chunk}"])
        chunk += 1
    return names


def _read_legacy_h5(root: h5py.Group, source: str) -> dict[str, list[np.ndarray]]:
    """Keras 1/2 (and Keras 3 `save("x.h5")`): `layer_names`, then per layer `weight_names`."""
    weights = {}
    for layer in _hdf5_name_list(root, "layer_names") or []:
        if layer not in root:
            raise WeightImportError(f"{source}: layer '{layer}' is listed in layer_names but "
                                    "has no group in the file")
        group = root[layer]
        names = _hdf5_name_list(group, "weight_names") or []
        # Arrays are taken in the listed order; a name like "block1_conv1/kernel:0" is a path
        # into nested groups, which h5py resolves.
        arrays = [np.asarray(group[name]) for name in names]
        if arrays:
            weights[layer] = arrays
    return weights


def _read_keras3_h5(root: h5py.Group,
                    layer_order: Sequence[tuple[str, str]]) -> dict[str, list[np.ndarray]]:
    """Keras 3 `.weights.h5`: `layers/<key>/vars/<i>`, the layer name in the `vars` attributes
    where the writer recorded it, else recovered from the class/position key."""
    names_by_key = _keras3_group_names(layer_order)
    weights = {}
    for key, group in root["layers"].items():
        if "vars" not in group or not len(group["vars"]):
            continue
        stored = group["vars"]
        recorded = _decode_names(stored.attrs.get("name"))
        layer = recorded[0] if recorded else names_by_key.get(key, key)
        weights[layer] = [np.asarray(stored[str(i)]) for i in range(len(stored))]
    return weights


def _read_keras_h5(f: h5py.File, source: str,
                   layer_order: Sequence[tuple[str, str]]) -> dict[str, list[np.ndarray]]:
    root = f["model_weights"] if "model_weights" in f else f
    if _hdf5_name_list(root, "layer_names") is not None:
        return _read_legacy_h5(root, source)
    if "layers" in f and isinstance(f["layers"], h5py.Group):
        return _read_keras3_h5(f, layer_order)
    raise WeightImportError(
        f"{source}: not a Keras weights file (no 'layer_names' attribute and no 'layers' group; "
        f"top-level entries: {sorted(f)})")


def _read_keras_archive(path: str,
                        layer_order: Sequence[tuple[str, str]]) -> dict[str, list[np.ndarray]]:
    """A Keras 3 `.keras` zip: its config names the layers, `model.weights.h5` holds the arrays.
    `layer_order` names them when the config is missing."""
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        if "model.weights.h5" not in members:
            raise WeightImportError(f"{path}: a zip file without model.weights.h5 (entries: "
                                    f"{members}); not a Keras 3 .keras file")
        if "config.json" in members:
            config = json.loads(archive.read("config.json"))
            layers = config.get("config", {}).get("layers", [])
            layer_order = [(layer["class_name"], layer["config"]["name"]) for layer in layers]
        data = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(data, "r") as f:
        return _read_keras_h5(f, f"{path}:model.weights.h5", layer_order)


def read_keras_weights(path: str | os.PathLike,
                       layer_order: Sequence[tuple[str, str]] = VGG16_KERAS_WEIGHTED_LAYERS
                       ) -> dict[str, list[np.ndarray]]:
    """Every weighted layer of a Keras weights file: layer name -> its arrays, in Keras' order
    (kernel, then bias; BatchNorm's gamma, beta, moving mean, moving variance). Reads the
    Keras 3 and legacy HDF5 layouts and `.keras` archives.

    `layer_order`: the (class, name) of the model's layers in model order, which names the
    groups of a Keras 3 file that does not record its layer names (VGG16's by default;
    `resnet_keras_layer_order` for a ResNet). Other layouts record the names and ignore it."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _read_keras_archive(path, layer_order)
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise WeightImportError(f"{path}: cannot be read as HDF5 ({error})") from error
    with f:
        return _read_keras_h5(f, path, layer_order)


def _kernel_and_bias(layers: Mapping[str, list[np.ndarray]], layer: str,
                     source: str) -> tuple[np.ndarray, np.ndarray]:
    if layer not in layers:
        raise WeightImportError(f"{source}: no layer '{layer}' with weights; the file has "
                                f"{sorted(layers)}. Is it a Keras VGG16?")
    arrays = layers[layer]
    kernels = [a for a in arrays if a.ndim > 1]
    biases = [a for a in arrays if a.ndim == 1]
    if len(kernels) != 1 or len(biases) != 1:
        raise WeightImportError(f"{source}: layer '{layer}' should hold one kernel and one bias, "
                                f"found arrays shaped {[a.shape for a in arrays]}")
    return kernels[0], biases[0]


def _dense_as_conv(kernel: np.ndarray, size: int, layer: str, source: str) -> np.ndarray:
    """A Dense kernel (size*size*c, out) as a size x size conv kernel (size, size, c, out).

    Keras flattens an NHWC tensor, so the rows run over (h, w, c) with c fastest, which is
    exactly the C order of an HWIO kernel: a plain reshape is right.
    """
    rows, out = kernel.shape
    if rows % (size * size):
        raise WeightImportError(f"{source}: layer '{layer}' kernel {kernel.shape} has {rows} rows, "
                                f"not a multiple of {size}x{size}; it is not VGG16's")
    return kernel.reshape(size, size, rows // (size * size), out)


def import_keras_vgg16(path: str | os.PathLike, variables: Variables,
                       fully_connected: bool = True) -> Variables:
    """F's variables with ImageNet VGG16 weights from a Keras file copied into the backbone.

    Copies block{b}_conv{i} into conv{b}_{i}; when the file has the top (fc1, fc2), reshapes
    them into fc6 (7x7x512x4096) and fc7 (1x1x4096x4096), otherwise leaves fc6 and fc7 as they
    are and says so in the log. The score layers and the frozen upsampling kernels are never
    touched. `variables` is F's tree ({'params': ..., 'frozen': ...}) at width 1.0.

    `fully_connected=False` copies the convolutions only: fc1 and fc2 are not read and fc6/fc7
    keep their initialisation (logged). That is DeepLab-v2 VGG16 LargeFOV's import
    (`models.deeplab.DeepLabV2VGG16`, same conv names): its fc6/fc7 are dilated 3x3
    convolutions to 1,024 channels that no ImageNet VGG16 top fits, and the AdaptSegNet code
    initialises them randomly too.

    Files written with `image_data_format="channels_first"` (Theano-era `th_dim_ordering`) order
    fc1's rows differently and are not supported; every file Keras distributes for TensorFlow is
    channels-last.
    """
    source = os.fspath(path)
    layers = read_keras_weights(source)
    flat = _flatten(variables)

    updates: dict[Path, tuple[np.ndarray, str]] = {}
    for keras_name, ours in VGG16_KERAS_CONVS:
        kernel, bias = _kernel_and_bias(layers, keras_name, source)
        updates[("params", ours, "kernel")] = (kernel, keras_name)
        updates[("params", ours, "bias")] = (bias, keras_name)

    present = [keras_name for keras_name, _, _ in VGG16_KERAS_FULLY_CONNECTED
               if keras_name in layers] if fully_connected else []
    if present and len(present) != len(VGG16_KERAS_FULLY_CONNECTED):
        raise WeightImportError(f"{source}: has {present} but not all of fc1 and fc2; a VGG16 "
                                "top has both")
    for keras_name, ours, size in VGG16_KERAS_FULLY_CONNECTED if present else ():
        kernel, bias = _kernel_and_bias(layers, keras_name, source)
        updates[("params", ours, "kernel")] = (_dense_as_conv(kernel, size, keras_name, source),
                                               keras_name)
        updates[("params", ours, "bias")] = (bias, keras_name)
    if not fully_connected:
        logger.info("%s: VGG16's convolutions only (fully_connected=False); fc6 and fc7 keep "
                    "their initialisation", source)
    elif not present:
        logger.warning("%s has no fc1/fc2 (a VGG16 without its top): fc6 and fc7 keep their "
                       "initialisation", source)

    return _with_keras_layers(variables, flat, updates, source, network="F",
                              expected="F's variables ({'params': ..., 'frozen': ...}) or "
                                       "DeepLab-v2 VGG16's")


# ------------------------------------------------------------------------------------------------
# Keras ResNet
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KerasResNetNames:
    """A naming scheme of Keras' ResNets: the (conv, BatchNorm) layer names of the stem and of
    each branch of block j (from 0) of our stage s (1-4; Keras' and Caffe's stage s + 1), and
    the BatchNorm epsilon of the networks named so."""

    description: str
    epsilon: float
    stem: tuple[str, str]
    # (stage, j, branch) -> (conv, bn); branch is 1, 2, 3 (the residual's convs) or 0 (the
    # projection shortcut).
    block: Callable[[int, int, int], tuple[str, str]]


def _applications_block(stage: int, j: int, branch: int) -> tuple[str, str]:
    name = f"conv{stage + 1}_block{j + 1}_{branch}"
    return f"{name}_conv", f"{name}_bn"


BLOCK_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _letters_block(stage: int, j: int, branch: int) -> tuple[str, str]:
    if j >= len(BLOCK_LETTERS):
        raise WeightImportError(f"the res2a_branch2a naming has letters for {len(BLOCK_LETTERS)} "
                                f"blocks a stage; stage {stage + 1} has more")
    name = f"{stage + 1}{BLOCK_LETTERS[j]}_branch{'1' if branch == 0 else '2' + 'abc'[branch - 1]}"
    return f"res{name}", f"bn{name}"


# keras.applications' ResNet50/101/152 (Keras 2.3+, tf.keras, Keras 3): conv1_conv, conv1_bn,
# conv{2-5}_block{1-}_{0-3}_conv/_bn, BatchNormalization(epsilon=1.001e-5).
KERAS_APPLICATIONS_NAMES = KerasResNetNames(
    "keras.applications' conv2_block1_1_conv", 1.001e-5, ("conv1_conv", "conv1_bn"),
    _applications_block)
# The older keras-applications ResNet50 (Keras <= 2.2, the files
# resnet50_weights_tf_dim_ordering_tf_kernels(_notop).h5), Caffe's names: conv1, bn_conv1,
# res2a_branch2a / bn2a_branch2a, the shortcut res2a_branch1; Keras' default epsilon 1e-3.
KERAS_LETTER_NAMES = KerasResNetNames(
    "keras-applications ResNet50's res2a_branch2a", 1e-3, ("conv1", "bn_conv1"),
    _letters_block)

# Our BatchNorm's epsilon (TorchBatchNorm, PyTorch's).
OUR_BN_EPSILON = TorchBatchNorm.epsilon

# Our module names of a bottleneck's (conv, BN) pairs, by branch as above.
OUR_BRANCHES = {1: ("conv1", "bn1"), 2: ("conv2", "bn2"), 3: ("conv3", "bn3"),
                0: ("downsample_conv", "downsample_bn")}

# Keras' order of a block's branches in its model: a functional model lists its layers by
# depth, and the shortcut conv/BN sit as deep as the third conv/BN, before them (Add takes
# [shortcut, x]): _1_conv, _1_bn, _2_conv, _2_bn, _0_conv, _3_conv, _0_bn, _3_bn.
KERAS_BLOCK_ORDER = ((1, "conv"), (1, "bn"), (2, "conv"), (2, "bn"), (0, "conv"), (3, "conv"),
                     (0, "bn"), (3, "bn"))


def _resnet_depth(blocks: Sequence[int]) -> int:
    return 3 * sum(blocks) + 2


def _resnet_layers(names: KerasResNetNames, blocks: Sequence[int],
                   projections: set[tuple[int, int]]) -> list[tuple[str, str, str, str]]:
    """(our conv, our BN, Keras conv, Keras BN) module names of a ResNet with `blocks` blocks
    per stage and a projection shortcut in the blocks (stage, j) of `projections`."""
    layers = [("conv1", "bn1", *names.stem)]
    for stage, count in enumerate(blocks, 1):
        for j in range(count):
            for branch in (1, 2, 0, 3) if (stage, j) in projections else (1, 2, 3):
                conv, bn = OUR_BRANCHES[branch]
                layers.append((f"layer{stage}_{j}/{conv}", f"layer{stage}_{j}/{bn}",
                               *names.block(stage, j, branch)))
    return layers


def resnet_keras_layer_order(blocks: Sequence[int],
                             projections: set[tuple[int, int]] | None = None
                             ) -> tuple[tuple[str, str], ...]:
    """(class, name) of the weighted layers of keras.applications' ResNet with `blocks` blocks
    per stage, in the model's order: what names the groups of a Keras 3 `.weights.h5` that does
    not record its layer names. `projections` (stage 1-4, block from 0): the blocks with a
    shortcut conv, by default each stage's first."""
    if projections is None:
        projections = {(stage, 0) for stage in range(1, len(blocks) + 1)}
    order = [("Conv2D", "conv1_conv"), ("BatchNormalization", "conv1_bn")]
    for stage, count in enumerate(blocks, 1):
        for j in range(count):
            for branch, kind in KERAS_BLOCK_ORDER:
                if branch or (stage, j) in projections:
                    conv, bn = _applications_block(stage, j, branch)
                    order.append(("Conv2D", conv) if kind == "conv"
                                 else ("BatchNormalization", bn))
    return tuple(order) + (("Dense", "predictions"),)


def _keras_resnet_names(layers: Mapping[str, list[np.ndarray]], source: str) -> KerasResNetNames:
    """The naming scheme of a file's layers."""
    if "conv1_conv" in layers or any(re.fullmatch(r"conv\d_block\d+_\d_(conv|bn)", name)
                                     for name in layers):
        return KERAS_APPLICATIONS_NAMES
    if "bn_conv1" in layers or any(re.fullmatch(r"(res|bn)\d[a-z]+_branch(1|2[abc])", name)
                                   for name in layers):
        return KERAS_LETTER_NAMES
    names = sorted(layers)
    raise WeightImportError(
        f"{source}: not a Keras ResNet: no layer conv1_conv (keras.applications' names) or "
        f"bn_conv1 (keras-applications ResNet50's); its layers with weights are "
        f"{names[:12]}{' ...' if len(names) > 12 else ''}")


def _resnet_tree_blocks(flat: Mapping[Path, Any], source: str) -> tuple[int, ...]:
    """The blocks per stage of the ResNet whose variables `flat` holds."""
    modules = {path[1] for path in flat if path[0] == "params" and len(path) > 2}
    blocks = []
    for stage in range(1, 5):
        count = 0
        while f"layer{stage}_{count}" in modules:
            count += 1
        blocks.append(count)
    if "conv1" not in modules or not all(blocks):
        raise WeightImportError(
            f"importing {source}: the variables are not a ResNet's (expected 'params' with "
            "conv1 and layer1_0 ... layer4_0, as ImageNetResNet and DeepLabV2ResNet have; "
            f"found {sorted(modules)[:12]})")
    return tuple(blocks)


def _conv_arrays(layers: Mapping[str, list[np.ndarray]], name: str,
                 source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A Keras Conv2D's kernel (kh, kw, in, out), flax's HWIO, and its bias (None without)."""
    arrays = layers[name]
    kernels = [a for a in arrays if a.ndim == 4]
    biases = [a for a in arrays if a.ndim == 1]
    if len(kernels) != 1 or len(biases) > 1 or len(arrays) != len(kernels) + len(biases):
        raise WeightImportError(f"{source}: layer '{name}' should hold a conv kernel and a "
                                f"bias, found arrays shaped {[a.shape for a in arrays]}")
    if biases and biases[0].shape != kernels[0].shape[-1:]:
        raise WeightImportError(f"{source}: layer '{name}' has a bias of shape {biases[0].shape} "
                                f"for a kernel of shape {kernels[0].shape}")
    return kernels[0], biases[0] if biases else None


def _batch_norm_arrays(layers: Mapping[str, list[np.ndarray]], name: str, channels: int,
                       source: str) -> list[np.ndarray]:
    """A Keras BatchNormalization's gamma, beta, moving_mean, moving_variance (their order in
    every Keras layout: trainable weights, then the statistics)."""
    arrays = layers[name]
    if len(arrays) != 4 or any(a.shape != (channels,) for a in arrays):
        raise WeightImportError(
            f"{source}: layer '{name}' should hold BatchNorm's gamma, beta, moving mean and "
            f"moving variance for the {channels} channels of its conv, found arrays shaped "
            f"{[a.shape for a in arrays]}")
    return arrays


def import_keras_resnet(path: str | os.PathLike, variables: Variables) -> Variables:
    """A ResNet's variables with ImageNet weights from a Keras ResNet50/101 file.

    `variables`: those of `models.resnet.ImageNetResNet` or `models.deeplab.DeepLabV2ResNet`
    ({"params", "frozen", "batch_stats"}, arrays or shapes) at width 1.0; the blocks per stage
    are read from them and the file must have exactly as many (ResNet-50: 3, 4, 6, 3;
    ResNet-101: 3, 4, 23, 3). DeepLab's classifiers are not touched. Reads every layout
    `read_keras_weights` does, and both naming schemes (KERAS_APPLICATIONS_NAMES,
    KERAS_LETTER_NAMES), told apart by the file's layer names; other layers of the file (the
    top, fc1000 or predictions) are ignored.

    Each conv kernel is copied as it is (Keras' (kh, kw, in, out) is flax's HWIO, and the
    networks take the same Caffe input); each conv's bias and Keras' BatchNorm epsilon go into
    the BatchNorm after it: mean = moving_mean - bias, var = moving_variance + (epsilon -
    1e-5), scale = gamma, bias = beta.
    """
    source = os.fspath(path)
    flat = _flatten(variables)
    blocks = _resnet_tree_blocks(flat, source)
    projections = {(stage, j) for stage, count in enumerate(blocks, 1) for j in range(count)
                   if ("params", f"layer{stage}_{j}", "downsample_conv", "kernel") in flat}
    layers = read_keras_weights(source, resnet_keras_layer_order(blocks, projections))
    names = _keras_resnet_names(layers, source)
    ours = _resnet_layers(names, blocks, projections)

    # Every ResNet's file has conv1, three convs a block and one shortcut conv a stage, so the
    # number of convolutions gives its depth (that of a Keras 3 file without recorded names
    # too, whose groups are named in the order of `blocks`).
    convolutions = sum(1 for arrays in layers.values() if any(a.ndim == 4 for a in arrays))
    missing = [keras for _, _, conv, bn in ours for keras in (conv, bn) if keras not in layers]
    if missing or convolutions != len(ours):
        wanted = f"ResNet-{_resnet_depth(blocks)} (blocks {blocks})"
        problems = []
        if missing:
            problems.append(f"no layer '{missing[0]}' in the file ({len(missing)} of the "
                            f"{2 * len(ours)} layers it needs missing, {names.description} "
                            "names)")
        if convolutions != len(ours):
            problems.append(f"the file has {convolutions} convolutions where {wanted} has "
                            f"{len(ours)}: it appears to be a ResNet-{convolutions - 3}; import "
                            "it into a network built with its blocks")
        raise WeightImportError(f"{source} does not fit the variables' {wanted}: "
                                + "; ".join(problems))

    updates: dict[Path, tuple[np.ndarray, str]] = {}
    for our_conv, our_bn, keras_conv, keras_bn in ours:
        kernel, bias = _conv_arrays(layers, keras_conv, source)
        gamma, beta, moving_mean, moving_variance = (
            np.asarray(a, np.float64)
            for a in _batch_norm_arrays(layers, keras_bn, kernel.shape[-1], source))
        # Keras: y = gamma * (conv(x) + b - moving_mean) / sqrt(moving_variance + eps) + beta;
        # ours, without the bias: y = scale * (conv(x) - mean) / sqrt(var + 1e-5) + bias. The
        # two are the same function when mean = moving_mean - b and var = moving_variance +
        # (eps - 1e-5): exact, no approximation, in inference. In DeepLab's training mode
        # (batch statistics) a per-channel constant added before BatchNorm shifts the batch
        # mean by as much and cancels, so the missing bias changes nothing there either.
        shift = 0.0 if bias is None else np.asarray(bias, np.float64)
        conv_path, bn_path = tuple(our_conv.split("/")), tuple(our_bn.split("/"))
        updates[("params", *conv_path, "kernel")] = (kernel, keras_conv)
        updates[("frozen", *bn_path, "scale")] = (gamma, keras_bn)
        updates[("frozen", *bn_path, "bias")] = (beta, keras_bn)
        updates[("batch_stats", *bn_path, "mean")] = (moving_mean - shift, keras_bn)
        updates[("batch_stats", *bn_path, "var")] = (
            moving_variance + (names.epsilon - OUR_BN_EPSILON), keras_bn)

    new = _with_keras_layers(variables, flat, updates, source, network="the network",
                             expected="a ResNet's variables ({'params', 'frozen', "
                                      "'batch_stats'}) of ImageNetResNet or DeepLabV2ResNet")
    logger.info("%s: Keras ResNet-%d weights (%s names, BatchNorm epsilon %g folded with the "
                "conv biases into the statistics)", source, _resnet_depth(blocks),
                names.description, names.epsilon)
    return new


# ------------------------------------------------------------------------------------------------
# PyTorch LSD-seg
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """How a PyTorch tensor's axes map to ours: `np.transpose` axes in each direction."""

    name: str
    to_ours: tuple[int, ...] | None  # None: same layout
    to_torch: tuple[int, ...] | None

    def from_torch(self, array: np.ndarray) -> np.ndarray:
        return array if self.to_ours is None else np.transpose(array, self.to_ours)

    def from_ours(self, array: np.ndarray) -> np.ndarray:
        # Always a fresh, writable, C-ordered copy: arrays viewed from jax are read-only, and
        # torch.from_numpy wants to own what it wraps.
        return np.array(array if self.to_torch is None else np.transpose(array, self.to_torch),
                        order="C")

    def torch_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
        ours = tuple(ours)
        return ours if self.to_torch is None else tuple(ours[a] for a in self.to_torch)


# Conv: PyTorch (out, in, kH, kW), ours HWIO (kH, kW, in, out).
CONV = Layout("conv", to_ours=(2, 3, 1, 0), to_torch=(3, 2, 0, 1))
# Transposed conv: PyTorch (in, out, kH, kW), ours (kH, kW, in, out); see
# lsd_jax.models.layers.conv_transpose_torch, which flips the kernel itself.
CONV_T = Layout("conv_transpose", to_ours=(2, 3, 0, 1), to_torch=(2, 3, 0, 1))
BIAS = Layout("bias", to_ours=None, to_torch=None)


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One tensor under both names: our variable path and the reference state_dict key."""

    ours: Path
    torch: str
    layout: Layout


# The layer tables: (our module, reference module, layer layout, has a bias). Our module paths
# are inside the "params" collection; "/" separates nested modules.
FCN8S_LAYERS = (
    tuple((f"conv{b}_{i}", f"conv{b}_{i}", CONV, True)
          for b, widths in enumerate(VGG_BLOCKS, 1) for i in range(1, len(widths) + 1))
    + (
        ("fc6", "fc6", CONV, True),
        ("fc7", "fc7", CONV, True),
        ("score_fr", "score_fr", CONV, True),
        ("score_pool3", "score_pool3", CONV, True),
        ("score_pool4", "score_pool4", CONV, True),
    ))
# F's bilinear upsamplers: a bare kernel in our "frozen" collection, `<name>.weight` there
# (in the reference's order of definition, which its state_dicts follow).
FCN8S_FROZEN = ("upscore2", "upscore8", "upscore_pool4")

GENERATOR_LAYERS = (
    ("up1", "stage1_upsample.0", CONV_T, False),
    ("res1_0/conv_layer", "stage1_upsample.3.conv_layer", CONV, False),
    ("res1_1/conv_layer", "stage1_upsample.4.conv_layer", CONV, False),
    ("up2", "stage1_upsample.5", CONV_T, False),
    ("res2_0/conv_layer", "stage1_upsample.8.conv_layer", CONV, False),
    ("res2_1/conv_layer", "stage1_upsample.9.conv_layer", CONV, False),
    ("up3", "stage2_upsample.0", CONV_T, False),
    ("res3_0/conv_layer", "stage2_upsample.3.conv_layer", CONV, False),
    ("res3_1/conv_layer", "stage2_upsample.4.conv_layer", CONV, False),
    ("up4", "stage3_upsample.0", CONV_T, False),
    ("res4_0/conv_layer", "stage3_upsample.3.conv_layer", CONV, False),
    ("res4_1/conv_layer", "stage3_upsample.4.conv_layer", CONV, False),
    ("up5", "stage3_upsample.5", CONV_T, False),
    ("res5_0/conv_layer", "stage3_upsample.8.conv_layer", CONV, False),
    ("res5_1/conv_layer", "stage3_upsample.9.conv_layer", CONV, False),
    ("to_image", "stage4_upsample.0", CONV_T, True),
)

DISCRIMINATOR_LAYERS = (
    ("stem", "feature.0", CONV, True),
    ("res1_0/conv_layer", "feature.3.conv_layer", CONV, True),
    ("res1_1/conv_layer", "feature.4.conv_layer", CONV, True),
    ("res1_2/conv_layer", "feature.5.conv_layer", CONV, True),
    ("res2_0/conv_layer", "feature.7.conv_layer", CONV, True),
    ("res2_1/conv_layer", "feature.8.conv_layer", CONV, True),
    ("res2_2/conv_layer", "feature.9.conv_layer", CONV, True),
    ("res3_0/conv_layer", "feature.11.conv_layer", CONV, True),
    ("res3_1/conv_layer", "feature.12.conv_layer", CONV, True),
    ("res3_2/conv_layer", "feature.13.conv_layer", CONV, True),
    ("out_s", "out_s.0", CONV, True),
    ("out_c", "out_c.0", CONV, True),
)


def _tensor_names(layers, frozen: Sequence[str] = ()) -> tuple[TensorName, ...]:
    """A layer table expanded to one row per tensor (kernel/weight, bias/bias)."""
    names = []
    for ours, reference, layout, has_bias in layers:
        module = ("params", *ours.split("/"))
        names.append(TensorName((*module, "kernel"), f"{reference}.weight", layout))
        if has_bias:
            names.append(TensorName((*module, "bias"), f"{reference}.bias", BIAS))
    names += [TensorName(("frozen", name), f"{name}.weight", CONV_T) for name in frozen]
    return tuple(names)


def _batch_norm_names(ours: str, reference: str) -> tuple[TensorName, ...]:
    """A TorchBatchNorm's four tensors: PyTorch's affine weight/bias (our "frozen" scale/bias)
    and running statistics (our "batch_stats")."""
    module = tuple(ours.split("/"))
    return (TensorName(("frozen", *module, "scale"), f"{reference}.weight", BIAS),
            TensorName(("frozen", *module, "bias"), f"{reference}.bias", BIAS),
            TensorName(("batch_stats", *module, "mean"), f"{reference}.running_mean", BIAS),
            TensorName(("batch_stats", *module, "var"), f"{reference}.running_var", BIAS))


def _aspp_layers(ours: str, reference: str):
    return tuple((f"{ours}/conv{k}", f"{reference}.conv2d_list.{k}", CONV, True)
                 for k in range(len(ASPP_DILATIONS)))


def _deeplab_resnet_names(blocks: Sequence[int], aux_classifier: bool) -> tuple[TensorName, ...]:
    """DeepLab-v2 ResNet under the names of the AdaptSegNet / ADVENT codes ("DeeplabMulti"):
    `layer6` is the main classifier (on layer4), `layer5` the auxiliary one (on layer3)."""
    names = list(_tensor_names((("conv1", "conv1", CONV, False),)))
    names += _batch_norm_names("bn1", "bn1")
    for stage, count in enumerate(blocks, 1):
        for j in range(count):
            ours, reference = f"layer{stage}_{j}", f"layer{stage}.{j}"
            for k in (1, 2, 3):
                names += _tensor_names(((f"{ours}/conv{k}", f"{reference}.conv{k}", CONV, False),))
                names += _batch_norm_names(f"{ours}/bn{k}", f"{reference}.bn{k}")
            if j == 0:
                names += _tensor_names(((f"{ours}/downsample_conv", f"{reference}.downsample.0",
                                         CONV, False),))
                names += _batch_norm_names(f"{ours}/downsample_bn", f"{reference}.downsample.1")
    names += _tensor_names(_aspp_layers("classifier", "layer6"))
    if aux_classifier:
        names += _tensor_names(_aspp_layers("classifier_aux", "layer5"))
    return tuple(names)


# DeepLab-v2 VGG16 LargeFOV as the AdaptSegNet code builds it: torchvision's `features` with
# pool4 (index 23) and pool5 removed, so conv5_x are features.23/25/27 and fc6/fc7 are
# features.29/31 behind them; the classifier is `classifier`.
def _largefov_layers():
    layers, index = [], 0
    for b, widths in enumerate(LARGEFOV_BLOCKS, 1):
        for i in range(1, len(widths) + 1):
            layers.append((f"conv{b}_{i}", f"features.{index}", CONV, True))
            index += 2  # conv, ReLU
        if b <= 3:
            index += 1  # the pool
    layers += [("fc6", f"features.{index}", CONV, True), ("fc7", f"features.{index + 2}", CONV, True)]
    return tuple(layers) + _aspp_layers("classifier", "classifier")


# Network -> every tensor it has, under both names. Used for import and export alike.
TORCH_NAMES: dict[str, tuple[TensorName, ...]] = {
    "F": _tensor_names(FCN8S_LAYERS, FCN8S_FROZEN),
    "G": _tensor_names(GENERATOR_LAYERS),
    "D": _tensor_names(DISCRIMINATOR_LAYERS),
    "deeplabv2_resnet101": _deeplab_resnet_names(RESNET101_BLOCKS, aux_classifier=False),
    "deeplabv2_resnet101_multi": _deeplab_resnet_names(RESNET101_BLOCKS, aux_classifier=True),
    "deeplabv2_vgg16": _tensor_names(_largefov_layers()),
}
NETWORK_NAMES = {"F": "F (FCN8s)", "G": "G (Generator)", "D": "D (Discriminator)",
                 "deeplabv2_resnet101": "DeepLab-v2 ResNet-101",
                 "deeplabv2_resnet101_multi": "DeepLab-v2 ResNet-101 with its auxiliary classifier",
                 "deeplabv2_vgg16": "DeepLab-v2 VGG16 LargeFOV"}

# PyTorch < 0.4 gave InstanceNorm running-statistics buffers that it never used (instance norm
# normalises with each image's own statistics, in training and in evaluation), so the reference
# checkpoints may carry them: they are dropped, as is BatchNorm's `num_batches_tracked` (our
# TorchBatchNorm uses a fixed momentum); statistics a name table lists (DeepLab's) are kept.
IGNORED_TORCH_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")

# Where training scripts commonly put the state_dict inside a checkpoint dict; LSD-seg's trainer
# saves F under "model_state_dict".
STATE_DICT_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")

DATA_PARALLEL_PREFIX = "module."


def _table(network: str) -> tuple[TensorName, ...]:
    if network not in TORCH_NAMES:
        raise ValueError(f"unknown network {network!r}; expected one of {sorted(TORCH_NAMES)}")
    return TORCH_NAMES[network]


def _check_table_fits(flat: Mapping[Path, Any], table: Sequence[TensorName], what: str) -> None:
    """The variables are those of the network `what` names, and the table names every one."""
    ours = {name.ours for name in table}
    absent = [_path_str(p) for p in ours if p not in flat]
    uncovered = [_path_str(p) for p in flat if p not in ours]
    if absent or uncovered:
        raise ValueError(
            f"the variables passed are not {what}'s: "
            + (f"missing {sorted(absent)}" if absent else "")
            + ("; " if absent and uncovered else "")
            + (f"not in the PyTorch name table: {sorted(uncovered)}" if uncovered else ""))


def _unwrap_state_dict(checkpoint: Any, key: str | None, source: str) -> Mapping[str, Any]:
    """The state_dict inside a checkpoint: `key` if given, else the checkpoint itself when all
    its values are tensors, else the first of STATE_DICT_WRAPPER_KEYS it has."""
    import torch

    if not isinstance(checkpoint, Mapping):
        raise WeightImportError(f"{source}: holds a {type(checkpoint).__name__}, not a state_dict "
                                "(save `module.state_dict()`, not the module)")
    if key is not None:
        if key not in checkpoint:
            raise WeightImportError(f"{source}: no entry {key!r}; it has {sorted(checkpoint)}")
        return _unwrap_state_dict(checkpoint[key], None, f"{source}[{key!r}]")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    for wrapper in STATE_DICT_WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            return _unwrap_state_dict(checkpoint[wrapper], None, f"{source}[{wrapper!r}]")
    raise WeightImportError(f"{source}: not a state_dict and none of {STATE_DICT_WRAPPER_KEYS} "
                            f"in it; its entries are {sorted(checkpoint)}: pass key=...")


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    # numpy has no bfloat16; float32 is what our parameters are kept in anyway.
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def load_torch_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch state_dict from a .pth file as numpy arrays under its plain names.

    Accepts a raw state_dict or one inside a checkpoint dict (under `key`, or found under one of
    STATE_DICT_WRAPPER_KEYS), and strips DataParallel's "module." prefix. Needs torch, which is
    imported only here.
    """
    import torch

    source = os.fspath(path)
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = _unwrap_state_dict(checkpoint, key, source)
    return {k.removeprefix(DATA_PARALLEL_PREFIX): _tensor_to_numpy(v) for k, v in state.items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray], variables: Variables, network: str,
                  source: str = "state_dict") -> Variables:
    """`variables` with every tensor of `network` ("F", "G" or "D") taken from a reference
    state_dict. `variables` may hold arrays or just shapes (jax.eval_shape of init).

    Raises WeightImportError listing every missing key, every unexpected key and every shape
    mismatch (key, expected shape in PyTorch's layout, found shape).
    """
    return _import_table(state_dict, variables, _table(network), NETWORK_NAMES[network], source)


def _import_table(state_dict: Mapping[str, np.ndarray], variables: Variables,
                  table: Sequence[TensorName], what: str, source: str) -> Variables:
    """`torch_to_flax` for any name table; `what` names the network in messages."""
    flat = _flatten(variables)
    _check_table_fits(flat, table, what)

    expected = [name.torch for name in table]
    listed = set(expected)
    state = {k: v for k, v in state_dict.items()
             if k in listed or not k.endswith(IGNORED_TORCH_SUFFIXES)}
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        lines = [f"{source} does not match the reference names of {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise WeightImportError("\n".join(lines))

    new, mismatches = dict(flat), []
    for name in table:
        found = np.asarray(state[name.torch])
        want = name.layout.torch_shape(flat[name.ours].shape)
        if found.shape != want:
            mismatches.append(f"  {name.torch}: expected {want}, found {found.shape} "
                              f"(ours: {_path_str(name.ours)})")
            continue
        new[name.ours] = _as_leaf(name.layout.from_torch(found), flat[name.ours])
    if mismatches:
        raise WeightImportError(
            "\n".join([f"{source}: shapes do not fit {what}:"] + mismatches
                      + ["  (reference checkpoints are full width: build the network with "
                         "width=1.0 and the checkpoint's number of classes)"]))
    return _rebuild_like(variables, new)


def flax_to_torch(variables: Variables, network: str) -> dict[str, np.ndarray]:
    """`network`'s variables as a reference-named PyTorch state_dict of numpy arrays (float32,
    PyTorch layouts), in the reference's order. Load it in PyTorch with
    `{k: torch.from_numpy(v) for k, v in ...}`."""
    table = _table(network)
    flat = _flatten(variables)
    _check_table_fits(flat, table, NETWORK_NAMES[network])
    return {name.torch: name.layout.from_ours(np.asarray(flat[name.ours], np.float32))
            for name in table}


def save_torch_state_dict(variables: Variables, network: str, path: str | os.PathLike) -> None:
    """Writes `flax_to_torch(variables, network)` as a .pth file PyTorch can load directly."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in flax_to_torch(variables, network).items()}
    torch.save(state, os.fspath(path))


def _import_torch(network: str, path, variables: Variables, key: str | None) -> Variables:
    return torch_to_flax(load_torch_state_dict(path, key), variables, network,
                         source=os.fspath(path))


def import_torch_fcn8s(path: str | os.PathLike, variables: Variables,
                       key: str | None = None) -> Variables:
    """F's variables ({'params', 'frozen'}) from a reference FCN8s_LSD state_dict (.pth)."""
    return _import_torch("F", path, variables, key)


def import_torch_generator(path: str | os.PathLike, variables: Variables,
                           key: str | None = None) -> Variables:
    """G's variables ({'params'}) from a reference _netG state_dict (.pth)."""
    return _import_torch("G", path, variables, key)


def import_torch_discriminator(path: str | os.PathLike, variables: Variables,
                               key: str | None = None) -> Variables:
    """D's variables ({'params'}) from a reference _netD state_dict (.pth)."""
    return _import_torch("D", path, variables, key)


# The AdaptSegNet / ADVENT codes start from a DeepLab ResNet-101 initialisation whose keys are
# nested under "Scale." and whose classifier "layer5" sits on layer4 with another class count;
# their code drops the prefix and skips that classifier for 19 classes.
DEEPLAB_INIT_PREFIX = "Scale."
DEEPLAB_CLASSIFIERS = ("layer5.", "layer6.", "classifier.")


def deeplab_table(backbone: str, variables: Variables,
                  blocks: Sequence[int] = RESNET101_BLOCKS) -> tuple[TensorName, ...]:
    """The name table of a DeepLab-v2 network's variables ("deeplabv2_resnet101" with its
    auxiliary classifier when the variables have one, or "deeplabv2_vgg16")."""
    if backbone == "deeplabv2_vgg16":
        return TORCH_NAMES["deeplabv2_vgg16"]
    if backbone != "deeplabv2_resnet101":
        raise ValueError(f"deeplab_table: expected a DeepLab-v2 backbone, got {backbone!r}")
    params = variables["params"]
    return _deeplab_resnet_names(tuple(blocks), aux_classifier="classifier_aux" in params)


def deeplab_state_dict(variables: Variables, backbone: str,
                       blocks: Sequence[int] = RESNET101_BLOCKS) -> dict[str, np.ndarray]:
    """A DeepLab-v2 network's variables as a PyTorch state_dict (numpy, PyTorch layouts) under
    the AdaptSegNet / ADVENT names: what `import_torch_deeplab` reads."""
    flat = _flatten(variables)
    return {name.torch: name.layout.from_ours(np.asarray(flat[name.ours], np.float32))
            for name in deeplab_table(backbone, variables, blocks)}


def import_torch_deeplab(path: str | os.PathLike, variables: Variables, backbone: str,
                         blocks: Sequence[int] = RESNET101_BLOCKS, key: str | None = None
                         ) -> tuple[Variables, list[str], list[str]]:
    """A DeepLab-v2 network's variables ({"params", "frozen", "batch_stats"}, arrays) from a
    PyTorch state_dict under the AdaptSegNet / ADVENT names: their released trained models, or
    the DeepLab initialisation they start from ("Scale." prefix dropped). Returns the
    variables, the classifiers that keep this network's initialisation and the file's
    classifiers left unused (reference module names, e.g. "layer5"): a classifier that the file
    lacks, or has for another class count or input, keeps this network's initialisation, as
    those codes do, and one this network does not have (a multi-level model's "layer5" in a
    single-level network) is not used; every other tensor must be in the file and fit.
    """
    source = os.fspath(path)
    state = {k.removeprefix(DEEPLAB_INIT_PREFIX): v
             for k, v in load_torch_state_dict(path, key).items()}
    table = deeplab_table(backbone, variables, blocks)
    flat = _flatten(variables)
    listed = {name.torch for name in table}
    unused = {k.split(".")[0] for k in state if k.startswith(DEEPLAB_CLASSIFIERS)
              and k not in listed}
    state = {k: v for k, v in state.items() if k.split(".")[0] not in unused}
    kept = set()
    for name in table:
        if not name.torch.startswith(DEEPLAB_CLASSIFIERS):
            continue
        found = state.get(name.torch)
        if found is None or np.shape(found) != name.layout.torch_shape(flat[name.ours].shape):
            kept.add(name.torch.split(".")[0])
    loaded = set(state)
    for module in kept:  # ours in place of the file's: torch_to_flax then takes them back
        state = {k: v for k, v in state.items() if not k.startswith(module + ".")}
        state.update({name.torch: name.layout.from_ours(np.asarray(flat[name.ours]))
                      for name in table if name.torch.startswith(module + ".")})
    what = NETWORK_NAMES["deeplabv2_vgg16" if backbone == "deeplabv2_vgg16"
                         else "deeplabv2_resnet101"]
    unused |= {module for module in kept if any(k.startswith(module + ".") for k in loaded)}
    return _import_table(state, variables, table, what, source), sorted(kept), sorted(unused)

# ------------------------------------------------------------------------------------------------
# Our own networks, one file each (`python -m lsd_jax.export`, `config.init.f_file`)
# ------------------------------------------------------------------------------------------------

NETWORK_FILE_SEPARATOR = "/"  # "params/conv1_1/kernel": a variable's path in the network


def save_network_file(variables: Variables, path: str | os.PathLike) -> str:
    """One network's variables ({"params", "frozen", "batch_stats"}) as a NumPy .npz, one array
    per variable named by its path; returns the file's sha256. Written to a temporary file and
    renamed, so that an interrupted export leaves no partial file under the name."""
    import hashlib

    target = os.fspath(path)
    flat = {_path_str(p): np.asarray(v) for p, v in _flatten(variables).items()}
    partial = target + ".partial"
    with open(partial, "wb") as f:
        np.savez(f, **flat)
    os.replace(partial, target)
    with open(target, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_network_file(path: str | os.PathLike) -> dict:
    """The nested variables that `save_network_file` wrote; WeightImportError naming the file
    when it is not such a file."""
    source = os.fspath(path)
    try:
        with np.load(source, allow_pickle=False) as archive:
            flat = {tuple(name.split(NETWORK_FILE_SEPARATOR)): archive[name]
                    for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise WeightImportError(f"{source}: not a network file of `python -m lsd_jax.export` "
                                f"(an .npz of one array per variable): {error}") from None
    if not flat or not all(p[0] in ("params", "frozen", "batch_stats") for p in flat):
        raise WeightImportError(f"{source}: expected arrays named params/..., frozen/... or "
                                f"batch_stats/... (a network file of `python -m lsd_jax.export`)"
                                f", found {sorted(flat)[:3] or 'none'}")
    nested = traverse_util.unflatten_dict(flat)
    return {name: nested.get(name, {}) for name in ("params", "frozen", "batch_stats")}
