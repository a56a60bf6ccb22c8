"""The methods on the DeepLab-v2 backbones (`config.model.backbone`): predictions at the image
size, BatchNorm's running statistics threaded through S's update (source pass, then target
pass) and left alone by D's, frozen statistics, what each backbone refuses, and the
aligned-corners upsampling against PyTorch.

A ResNet with one block per stage (`config.model.resnet_blocks`) keeps compilation short; the
101-layer network is checked against PyTorch in test_deeplab.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import default
from lsd_jax import methods
from lsd_jax.methods import base
from lsd_jax.models.layers import upsample_bilinear_align_corners
from test_steps import assert_trees_equal, learnable_batch, trees_differ

# Many large programs: freed for the modules after this one (conftest.py).
pytestmark = pytest.mark.usefixtures("release_compiled_programs")


def deeplab_config(variant="adaptsegnet_multi", backbone="deeplabv2_resnet101", **model):
    config = default.apply_variant(default.get_config(), variant)
    config.model.backbone = backbone
    config.model.width = 1 / 16
    config.model.resnet_blocks = (1, 1, 1, 1)
    config.model.update(model)
    return config


@functools.cache
def built(variant="adaptsegnet_multi", backbone="deeplabv2_resnet101", bn_statistics="batch"):
    method = methods.build(deeplab_config(variant, backbone, bn_statistics=bn_statistics))
    return method, method.init(jax.random.key(0)), methods.compile_method(method, donate=False)


@pytest.mark.parametrize("size_in, size_out", [((5, 7), (33, 41)), ((8, 8), (64, 64)),
                                               ((1, 3), (4, 9))])
def test_upsampling_is_pytorchs_bilinear_with_aligned_corners(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((2, *size_in, 3)).astype(np.float32)
    ours = upsample_bilinear_align_corners(jnp.asarray(x), size_out)
    reference = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out,
                              mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles whole networks' gradients
@pytest.mark.parametrize("variant, backbone", [("adaptsegnet_multi", "deeplabv2_resnet101"),
                                               ("advent", "deeplabv2_resnet101"),
                                               ("adaptsegnet", "deeplabv2_vgg16"),
                                               ("source_only", "deeplabv2_resnet101")])
def test_an_iteration_on_deeplab_trains_its_networks_and_predicts_at_image_size(variant,
                                                                                 backbone):
    method, states, compiled = built(variant, backbone)
    batch = learnable_batch()
    new, metrics = compiled.step(states, batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for name in method.networks:
        assert trees_differ(states[name].params, new[name].params), name
    assert_trees_equal(states["f"].frozen, new["f"].frozen)  # BN's affine: never trained
    scores = method.predict(new["f"].variables(), batch["source_image"])
    assert scores.shape == (*batch["source_image"].shape[:3], 19)
    f_shapes = method.output_shapes(states, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    # DeepLab's own output, about 1/8 size: ResNet's ceil-mode stem pool rounds up (64 -> 9),
    # LargeFOV's floor-mode pools down (64 -> 8).
    side = {"deeplabv2_resnet101": 9, "deeplabv2_vgg16": 8}[backbone]
    assert f_shapes["f"]["score"].shape == (1, side, side, 19)


@pytest.mark.slow  # compiles whole networks' gradients
def test_s_update_leaves_the_statistics_of_its_source_then_target_passes():
    method, states, compiled = built()
    batch, key = learnable_batch(), jax.random.key(1)
    new, _ = compiled.updates["f"](states, batch, key)
    f = method.networks["f"]
    variables = states["f"].variables()
    for domain in ("source", "target"):
        _, mutated = f.apply(variables, batch[f"{domain}_image"], train=True,
                             mutable=["batch_stats"])
        variables = {**variables, **mutated}
    assert trees_differ(states["f"].batch_stats, new.batch_stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new.batch_stats, variables["batch_stats"])
    # D's updates compute S's maps too, but leave S's statistics to S's update (and cannot
    # return S's state at all).
    for level in ("d", "d_aux"):
        d_new, _ = compiled.updates[level](states, batch, key)
        assert jax.tree.structure(d_new) == jax.tree.structure(states[level])


def stem_forward_passes(compiled_text: str, batch: dict) -> int:
    """How many times a compiled program applies ResNet's stem convolution (7x7, stride 2) to a
    batch of images: once per forward pass of S over one domain's batch (its weight gradient's
    convolution has the kernel's shape instead, and no gradient flows to the images)."""
    n, h, w, _ = batch["source_image"].shape
    output = re.compile(rf"= f32\[{n},{-(-h // 2)},{-(-w // 2)},\d+\]")
    return sum(1 for line in compiled_text.splitlines()
               if "convolution(" in line and "size=7x7" in line and output.search(line))


@pytest.mark.slow  # lowers the iteration test_an_iteration_on_deeplab_... compiled (cached)
def test_the_multi_level_d_updates_recompute_no_forward_pass_of_s():
    """Each of AdaptSegNet's two D updates calls S on the source and the target images
    (detached, with S's dropout keys). In the reference's simultaneous mode these are S's own
    forward passes of the iteration, and XLA computes them once: the compiled iteration runs
    S's stem twice (source, target), not six times. (In "alternating" mode the D updates see
    the updated S: 4, one new pass per domain shared by both levels; docs/methods.md, 8.)"""
    method, states, compiled = built()
    assert method.mode == "simultaneous" and set(method.networks) == {"f", "d", "d_aux"}
    batch = learnable_batch()
    text = compiled.step.lower(states, batch, jax.random.key(1)).compile().as_text()
    assert stem_forward_passes(text, batch) == 2


@pytest.mark.slow  # compiles whole networks' gradients
def test_frozen_statistics_stay_and_batch_statistics_normalise_in_training():
    method, states, compiled = built(bn_statistics="frozen")
    new, _ = compiled.step(states, learnable_batch(), jax.random.key(1))
    assert_trees_equal(states["f"].batch_stats, new["f"].batch_stats)
    assert trees_differ(states["f"].params, new["f"].params)


def test_each_backbone_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="config.model.backbone='deeplabv2_resnet101'.*LSD's G"):
        methods.build(deeplab_config("lsd"))
    with pytest.raises(ValueError, match="'deeplabv2_vgg16' has no auxiliary level"):
        methods.build(deeplab_config("adaptsegnet_multi", "deeplabv2_vgg16"))
    with pytest.raises(ValueError, match="config.model.backbone: expected one of"):
        methods.build(deeplab_config(backbone="resnet101"))
    with pytest.raises(ValueError, match="config.model.bn_statistics: expected one of"):
        methods.build(deeplab_config(bn_statistics="moving"))
    with pytest.raises(ValueError, match="config.model.aspp_branches: expected one of"):
        methods.build(deeplab_config(aspp_branches=3))
    with pytest.raises(ValueError, match=r"config.model.resnet_blocks=\(3, 4\): expected four"):
        methods.build(deeplab_config(resnet_blocks=(3, 4)))


def test_deeplab_classifiers_learn_at_ten_times_the_rate():
    from lsd_jax.methods import adaptsegnet
    params = built()[1]["f"].params
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: adaptsegnet.is_classifier(path), params)
    assert all(jax.tree.leaves(labels["classifier"])) and all(
        jax.tree.leaves(labels["classifier_aux"]))
    assert not any(jax.tree.leaves(labels["layer4_0"])) and not any(
        jax.tree.leaves(labels["conv1"]))


def test_outputs_are_named_per_backbone():
    assert base.output_names(built()[0].networks["f"]) == ("score", "layer4", "layer3",
                                                           "score_aux")
    assert base.output_names(built("adaptsegnet", "deeplabv2_vgg16")[0].networks["f"]) == (
        "score", "fc7")


# ----------------------------------------------------------------------------- weights

def save_state_dict(state: dict, path) -> str:
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.slow  # compiles whole networks' gradients
def test_reference_deeplab_files_start_a_run(tmp_path):
    """config.init.torch_f with a DeepLab backbone: the AdaptSegNet / ADVENT initialisation
    ("Scale." prefix, its layer5 classifier on layer4 for other classes) gives the backbone and
    its statistics, the classifiers keep this run's initialisation; a released multi-level
    model gives everything, and in a single-level network its auxiliary classifier is unused;
    a missing backbone tensor is named."""
    from lsd_jax import programs, weights
    from lsd_jax.weights import WeightImportError

    method, states, _ = built()
    released = methods.build(deeplab_config()).init(jax.random.key(7))["f"].variables()
    # Running statistics of a trained network (fresh ones are zeros and ones everywhere).
    released["batch_stats"] = jax.tree.map(lambda x: x + 0.25, released["batch_stats"])
    blocks = (1, 1, 1, 1)
    state = weights.deeplab_state_dict(released, "deeplabv2_resnet101", blocks)
    assert {k.split(".")[0] for k in state} >= {"conv1", "layer4", "layer5", "layer6"}

    init = {f"Scale.{k}": v for k, v in state.items() if not k.startswith(("layer5", "layer6"))}
    init.update({f"Scale.layer5.conv2d_list.{k}.weight": np.zeros((21, 128, 3, 3), np.float32)
                 for k in range(4)})  # on layer4 (2,048 x 1/16 channels), 21 classes
    config = deeplab_config()
    config.init.torch_f = save_state_dict(init, tmp_path / "init.pth")
    imported = programs._import_weights(config, method, states)["f"]
    for collection in ("params", "frozen", "batch_stats"):
        ours, theirs = imported.variables()[collection], released[collection]
        for name in ours:
            expected = states["f"].variables()[collection][name] if name.startswith(
                "classifier") else theirs[name]
            assert_trees_equal(ours[name], expected)
    assert trees_differ(imported.batch_stats, states["f"].batch_stats)

    single_method, single_states, _ = built("adaptsegnet")
    config = deeplab_config("adaptsegnet")
    config.init.torch_f = save_state_dict(state, tmp_path / "released_multi.pth")
    imported = programs._import_weights(config, single_method, single_states)["f"]
    assert_trees_equal(imported.params["classifier"], released["params"]["classifier"])
    assert "classifier_aux" not in imported.params
    variables, kept, unused = weights.import_torch_deeplab(
        config.init.torch_f, single_states["f"].variables(), "deeplabv2_resnet101", blocks)
    assert (kept, unused) == ([], ["layer5"])

    broken = {k: v for k, v in state.items() if k != "layer3.0.conv2.weight"}
    config.init.torch_f = save_state_dict(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightImportError, match=r"(?s)broken.pth does not match .* missing keys "
                                                r"\(1\): layer3.0.conv2.weight"):
        programs._import_weights(config, single_method, single_states)
