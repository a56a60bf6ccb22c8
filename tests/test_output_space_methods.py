"""AdaptSegNet and ADVENT as methods: their networks and updates, where gradients flow, the loss
against a PyTorch transcription of docs/methods.md section 8, learning, float64, bad input.

Tiny widths and 64x64 images; every variant's programs are compiled once per module.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import default
from lsd_jax import methods
from lsd_jax.methods import adaptsegnet
from test_gradients import assert_close, to_float64
from test_output_space import load_into_torch, torch_fc_discriminator
from test_steps import assert_trees_equal, changed_fraction, learnable_batch, trees_differ

CLASSES = 19


def variant_config(variant: str, **fields):
    """configs/default.py's variant at 1/16 width; `fields` set in the method's block."""
    config = default.apply_variant(default.get_config(), variant)
    config.model.width = 1 / 16
    config.model.dropout_rate = 0.0  # float64 checks would draw other masks
    if config.method in ("adaptsegnet", "advent"):
        # Rates at which 40 steps on one batch visibly fit it (from He-initialised VGG, large
        # features, SGD's first steps overshoot at higher ones), for every test: the learning
        # rates are constants of the compiled programs, so one set of rates is one set of
        # programs per variant.
        config[config.method].update(s_lr=1e-4, d_lr=1e-3)
    if fields:
        config[config.method].update(fields)
    return config


@functools.cache
def built(variant: str, **fields):
    method = methods.build(variant_config(variant, **fields))
    return method, method.init(jax.random.key(0)), methods.compile_method(method, donate=False)


@pytest.mark.slow  # compiles whole networks' gradients
@pytest.mark.parametrize("variant, networks", [
    ("adaptsegnet", ["f", "d"]),
    ("adaptsegnet_multi", ["f", "d", "d_aux"]),
    ("advent", ["f", "d", "d_aux"]),
    ("minent", ["f"]),
])
def test_each_update_changes_its_own_network_and_no_other(variant, networks):
    """15-25 s per variant: compiles the variant's S and D updates and its iteration."""
    method, states, compiled = built(variant)
    assert list(method.networks) == list(states) == list(method.updates) == networks
    assert method.mode == "simultaneous" and method.reads_target
    batch, key = learnable_batch(), jax.random.key(1)
    new, metrics = compiled.step(states, batch, key)
    for name in networks:
        own, _ = compiled.updates[name](states, batch, key)
        assert jax.tree.structure(own) == jax.tree.structure(states[name])
        assert_trees_equal(own, new[name])  # simultaneous: the separate update is the same
        # D's classifier and S's score layers start where every gradient reaches them.
        assert changed_fraction(states[name].params, own.params) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # Every method's run of one seed starts from the same F (here without the aux head).
    lsd_f = methods.build(variant_config("lsd")).init(jax.random.key(0))["f"].params
    assert_trees_equal(lsd_f, {k: v for k, v in states["f"].params.items() if k != "score_aux"})


def with_scores(s_params):
    """S's parameters with weight in the score layers (zeros at the start), so that S's maps
    are not uniform."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (0.05 * jax.random.normal(jax.random.key(len(path[0].key)), x.shape,
                                                  x.dtype)
                         if adaptsegnet.is_classifier(path) else x), s_params)


def s_after_update(variant, d_states, batch, **fields):
    """S's parameters after its update, from S with weight in its score layers (at zero, S's
    maps are uniform, where the entropy's gradient vanishes)."""
    method, states, compiled = built(variant, **fields)
    s = states["f"].replace(params=with_scores(states["f"].params))
    states = {**states, **d_states, "f": s}
    return compiled.updates["f"](states, batch, jax.random.key(1))[0].params


@pytest.mark.slow  # compiles whole networks' gradients
@pytest.mark.parametrize("variant", ["adaptsegnet_multi", "advent"])
def test_d_reaches_s_only_through_the_adversarial_terms(variant):
    """Two different D's give two different S updates, unless S's adversarial weights are 0;
    and S's update never returns D (each update returns its own network)."""
    method, states, _ = built(variant)
    other = methods.build(variant_config(variant)).init(jax.random.key(5))
    other_d = {name: other[name] for name in ("d", "d_aux")}
    batch = learnable_batch()
    assert trees_differ(s_after_update(variant, {}, batch), s_after_update(variant, other_d, batch))
    zero = ({"adv_weight": 0.0, "adv_aux_weight": 0.0} if method.name == "adaptsegnet" else
            {"target_weight": 0.0, "target_aux_weight": 0.0})
    assert_trees_equal(s_after_update(variant, {}, batch, **zero),
                       s_after_update(variant, other_d, batch, **zero))


@pytest.mark.slow  # compiles whole networks' gradients
def test_d_updates_see_s_detached_and_minent_sees_the_target():
    # D's gradient is the same whatever S's parameters' cotangent would be: D's update is a
    # function of S's outputs alone. Check it through the whole update: a D update from S's
    # parameters equals one from S's parameters passed through stop_gradient.
    method, states, compiled = built("advent")
    batch, key = learnable_batch(), jax.random.key(1)
    grads = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(compiled.updates["d"](
        {**states, "f": states["f"].replace(params=p)}, batch, key)[0].params)))(
        states["f"].params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    # MinEnt: S learns from the target images (their entropy), and from nothing else there.
    other_target = {**batch, "target_image": batch["target_image"] * 0.3 + 20.0}
    assert trees_differ(s_after_update("minent", {}, batch),
                        s_after_update("minent", {}, other_target))
    assert_trees_equal(s_after_update("minent", {}, batch, target_weight=0.0,
                                      target_aux_weight=0.0),
                       s_after_update("minent", {}, other_target, target_weight=0.0,
                                      target_aux_weight=0.0))


@pytest.mark.slow  # compiles whole networks' gradients
@pytest.mark.parametrize("variant", ["adaptsegnet_multi", "minent"])
def test_losses_fall_when_overfitting_a_batch(variant):
    _, states, compiled = built(variant)  # the iteration of test_each_update_...
    batch = learnable_batch()
    history = []
    for i in range(40):
        states, metrics = compiled.step(states, batch, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["f/seg"] <= 0.5 * history[0]["f/seg"], [h["f/seg"] for h in history]
    if variant == "adaptsegnet_multi":
        # (weighted 0.1 in S's loss, it learns more slowly)
        assert history[-1]["f/seg_aux"] <= 0.9 * history[0]["f/seg_aux"]
        # The two domains have different colours: D learns to tell them apart.
        assert history[-1]["d/loss"] < history[0]["d/loss"]
        assert history[-1]["d/acc_source"] + history[-1]["d/acc_target"] > 1.5


@pytest.mark.slow  # compiles whole networks' gradients
def test_alternating_and_simultaneous_differ():
    config = variant_config("adaptsegnet")
    config.update_mode = "alternating"
    alternating = methods.compile_method(methods.build(config), donate=False)
    _, states, simultaneous = built("adaptsegnet")
    batch, key = learnable_batch(), jax.random.key(2)
    alt, _ = alternating.step(states, batch, key)
    sim, _ = simultaneous.step(states, batch, key)
    assert_trees_equal(alt["f"], sim["f"])  # S first in both, from the same states
    assert trees_differ(alt["d"].params, sim["d"].params)  # D sees the new S only alternating


# ----------------------------------------------------------------------------- the losses

def torch_s_loss(source, target, labels, d_modules, d_input, weights, gan, direct):
    """S's loss of docs/methods.md, sections 8.2-8.3, from S's (upsampled) logits by level."""
    ce = lambda x: F.cross_entropy(x, labels, ignore_index=255)  # noqa: E731
    loss = ce(source["d"])
    if "d_aux" in source:
        loss = loss + weights["seg_aux"] * ce(source["d_aux"])
    for level, weight in (("d", weights["adv"]), ("d_aux", weights["adv_aux"])):
        if level not in target:
            continue
        if direct:
            p = F.softmax(target[level], dim=1)
            term = torch.mean(torch.sum(-p * torch.log2(p + 1e-30), dim=1) / np.log2(CLASSES))
        else:
            d_out = d_modules[level](d_input(target[level]))
            if gan == "ls":
                term = torch.mean((d_out - 0) ** 2)
            else:
                term = F.binary_cross_entropy_with_logits(d_out, torch.zeros_like(d_out))
        loss = loss + weight * term
    return loss


def torch_self_information(logits):
    p = F.softmax(logits, dim=1)
    return -p * torch.log2(p + 1e-30) / np.log2(CLASSES)


def as_torch(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def parts_of(variant, **fields):
    config = variant_config(variant, **fields)
    build_parts = {"adaptsegnet": adaptsegnet.build_parts,
                   "advent": methods.advent.build_parts}[config.method]
    return build_parts(config)


# The reference's weights (seg_aux, target term main, target term aux), docs/methods.md section 8.
REFERENCE_WEIGHTS = {"adaptsegnet": (0.0, 0.001, 0.0), "adaptsegnet_multi": (0.1, 0.001, 0.0002),
                     "adaptsegnet_ls": (0.0, 0.01, 0.0), "advent": (0.1, 0.001, 0.0002),
                     "minent": (0.1, 0.001, 0.0002)}


@pytest.mark.parametrize("variant", sorted(REFERENCE_WEIGHTS))
def test_s_loss_matches_a_pytorch_transcription(variant):
    method, states, _ = built(variant)
    parts = parts_of(variant)
    w = parts.weights
    assert (w.seg_aux, w.adv, w.adv_aux) == REFERENCE_WEIGHTS[variant]
    batch, key = learnable_batch(), jax.random.key(3)
    s_params = with_scores(states["f"].params)
    d_params = {level: states[level].params for level in ("d", "d_aux") if level in states}
    variables = states["f"].variables(s_params)
    loss, (terms, _) = adaptsegnet.s_loss(parts, variables, d_params, batch, key)

    source, target = ({level: as_torch(o) for level, o in adaptsegnet.level_outputs(
        parts, variables, batch[f"{domain}_image"],
        methods.base.f_dropout_key(key, domain))[0].items()}
        for domain in ("source", "target"))
    d_modules = {}
    for level, params in d_params.items():
        d_modules[level] = torch_fc_discriminator(CLASSES, ndf=4)  # 64 channels x 1/16
        load_into_torch(params, d_modules[level])
    d_input = (torch_self_information if method.name == "advent"
               else lambda x: F.softmax(x, dim=1))
    labels = torch.from_numpy(np.asarray(batch["source_label"]).astype(np.int64))
    expected = torch_s_loss(source, target, labels, d_modules, d_input,
                            {"seg_aux": w.seg_aux, "adv": w.adv, "adv_aux": w.adv_aux},
                            parts.gan, parts.direct_term is not None)
    np.testing.assert_allclose(float(loss), float(expected.detach()), rtol=1e-5)
    assert float(terms["seg"]) > 0


def test_d_loss_matches_a_pytorch_transcription():
    parts = adaptsegnet.build_parts(variant_config("adaptsegnet"))
    _, states, _ = built("adaptsegnet")
    logits = jax.random.normal(jax.random.key(4), (2, 2, 64, 64, CLASSES)) * 2
    loss, metrics = adaptsegnet.d_loss(parts, states["d"].params, logits[0], logits[1])
    reference = torch_fc_discriminator(CLASSES, ndf=4)
    load_into_torch(states["d"].params, reference)
    out = [reference(F.softmax(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                               dim=1)) for x in logits]
    expected = 0.5 * (F.binary_cross_entropy_with_logits(out[0], torch.zeros_like(out[0]))
                      + F.binary_cross_entropy_with_logits(out[1], torch.ones_like(out[1])))
    np.testing.assert_allclose(float(loss), float(expected.detach()), rtol=1e-5)
    assert 0.0 <= float(metrics["acc_source"]) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["adaptsegnet_multi", "advent"])
def test_compiled_s_and_d_gradients_match_float64(variant):
    """S's and each D's loss gradients, compiled, against the same functions in float64."""
    _, states, _ = built(variant)

    def grads(dtype):
        parts = parts_of(variant)
        parts = dataclasses.replace(parts, s=parts.s.clone(dtype=dtype),
                                    d=parts.d.clone(dtype=dtype))
        # `states` were built outside x64 mode: initialisers draw other numbers in it.
        s_params, batch, key = with_scores(states["f"].params), learnable_batch(), jax.random.key(1)
        d_params = {level: states[level].params for level in parts.levels}
        frozen = states["f"].frozen
        if dtype == jnp.float64:
            s_params, frozen, d_params, batch = to_float64((s_params, frozen, d_params, batch))
        out = {"f": jax.jit(jax.grad(lambda p: adaptsegnet.s_loss(
            parts, {"params": p, "frozen": frozen}, d_params, batch, key)[0]))(s_params)}
        variables = {"params": s_params, "frozen": frozen}
        maps = [adaptsegnet.level_outputs(parts, variables, batch[f"{domain}_image"],
                                          methods.base.f_dropout_key(key, domain))[0]
                for domain in ("source", "target")]
        for level in parts.levels:
            out[level] = jax.jit(jax.grad(lambda p, level=level: adaptsegnet.d_loss(
                parts, p, maps[0][level], maps[1][level])[0]))(d_params[level])
        return out

    f32 = grads(jnp.float32)
    with jax.enable_x64(True):
        reference = jax.tree.map(np.asarray, grads(jnp.float64))
    for name in f32:
        assert_close(f32[name], reference[name], f"{variant} {name}: float32 against float64")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("variant, fields, message", [
    ("adaptsegnet", {"adv_weight": -0.001}, r"config.adaptsegnet.adv_weight=-0.001: expected a "
                                            r"weight >= 0"),
    ("adaptsegnet", {"gan": "wgan"}, r"config.adaptsegnet.gan: expected one of \('bce', 'ls'\)"),
    ("advent", {"kind": "entropy"}, r"config.advent.kind: expected one of \('advent', 'minent'\)"),
    ("advent", {"target_aux_weight": -1.0}, r"config.advent.target_aux_weight=-1.0"),
    ("minent", {"s_lr": 0.0}, r"config.advent.s_lr=0.0: expected a positive number"),
])
def test_bad_method_fields_are_named(variant, fields, message):
    with pytest.raises(ValueError, match=message):
        methods.build(variant_config(variant, **fields))


def test_unknown_methods_and_variants_are_named():
    config = default.get_config()
    config.method = "adaptsegnet2"
    with pytest.raises(ValueError, match=r"config.method: expected one of \('lsd', "):
        methods.build(config)
    with pytest.raises(ValueError, match=r"config argument 'advent_multi': expected one of"):
        default.apply_variant(default.get_config(), "advent_multi")
