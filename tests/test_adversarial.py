"""The unified adversarial framework (`methods/adversarial.py`, docs/methods.md section 10):
its discriminators and losses against PyTorch transcriptions of the description, where each
update's gradients go (tied, untied with C and the source network fixed, the D-accuracy gate),
learning, float64, bad input.

Tiny widths and 64x64 images; each variant is compiled once per module.
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
from lsd_jax import methods, programs, size_constraints
from lsd_jax.methods import adversarial
from lsd_jax.models.domain_discriminators import ASPPDiscriminator, PixelDiscriminator
from test_gradients import assert_close, to_float64
from test_steps import assert_trees_equal, changed_fraction, learnable_batch, trees_differ

pytestmark = pytest.mark.usefixtures("release_compiled_programs")

CLASSES = 19


def variant_config(variant: str, **fields):
    """configs/default.py's variant at 1/16 width, no dropout (float64 checks would draw other
    masks); `fields` set in config.adversarial."""
    config = default.apply_variant(default.get_config(), variant)
    config.model.width = 1 / 16
    config.model.dropout_rate = 0.0
    config.adversarial.d_dropout = 0.0
    config.optim.f_lr = 1e-3  # He-initialised F at 1/16 width learns at this rate
    config.adversarial.update(fields)
    return config


@functools.cache
def built(variant: str, **fields):
    method = methods.build(variant_config(variant, **fields))
    return method, method.init(jax.random.key(0)), methods.compile_method(method, donate=False)


def with_scores(s_params):
    """S's parameters with weight in the score layers (zero at the start)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (0.05 * jax.random.normal(jax.random.key(len(path[0].key)), x.shape,
                                                  x.dtype)
                         if adversarial.is_classifier(path) else x), s_params)


# ----------------------------------------------------------------------------- discriminators

def torch_pixel_discriminator(channels, hidden):
    layers, previous = [], channels
    for width in hidden:
        layers += [torch.nn.Conv2d(previous, width, 1), torch.nn.ReLU()]
        previous = width
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(previous, 2, 1))


def torch_aspp(d_params):
    """FCAN's ASPP discriminator written out in PyTorch, loaded with `d_params` (any width)."""
    channels, features = d_params["aspp1"]["kernel"].shape[2:]
    branches = [torch.nn.Conv2d(channels, features, 3, padding=d, dilation=d)
                for d in (1, 2, 3, 4)]
    classifier = torch.nn.Conv2d(4 * features, 1, 1)
    load_convs(d_params, ["aspp1", "aspp2", "aspp3", "aspp4", "classifier"],
               branches + [classifier])
    return lambda x: classifier(torch.relu(torch.cat([b(x) for b in branches], dim=1)))


def load_convs(params, names, convs):
    with torch.no_grad():
        for name, conv in zip(names, convs, strict=True):
            kernel = np.asarray(params[name]["kernel"])  # (kh, kw, in, out)
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))


def count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("module, channels, expected", [
    (PixelDiscriminator((1024, 512)), 4096, 4_721_154),    # ADDA on fc7
    (PixelDiscriminator((512, 256)), CLASSES, 142_082),    # ADDA on the score map
    (PixelDiscriminator((1024, 1024)), 4096, 5_246_978),   # FCNs in the Wild
    (ASPPDiscriminator(), 4096, 18_875_393),               # FCAN on fc7
    (ASPPDiscriminator(), 2048, 9_438_209),                # FCAN on DeepLab's layer4
])
def test_discriminator_sizes(module, channels, expected):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4, 4, channels))))
    assert count(shapes["params"]) == expected


def test_discriminators_match_pytorch_transcriptions():
    maps = jax.random.normal(jax.random.key(0), (2, 9, 11, 24))
    torch_maps = torch.from_numpy(np.asarray(maps).transpose(0, 3, 1, 2).copy())

    pixel = PixelDiscriminator((16, 8), dropout_rate=0.5)
    variables = pixel.init(jax.random.key(1), maps)
    reference = torch_pixel_discriminator(24, (16, 8))
    load_convs(variables["params"], ["hidden0", "hidden1", "classifier"],
               [m for m in reference if isinstance(m, torch.nn.Conv2d)])
    out = reference(torch_maps).detach().numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(pixel.apply)(variables, maps))  # evaluation mode: no dropout
    assert got.shape == (2, 9, 11, 1)
    # One logit: target minus source, whose BCE is the 2-way softmax cross-entropy.
    np.testing.assert_allclose(got[..., 0], out[..., 1] - out[..., 0], rtol=1e-5, atol=1e-5)

    aspp = ASPPDiscriminator()
    variables = aspp.init(jax.random.key(2), maps)
    expected = torch_aspp(variables["params"])(torch_maps).detach().numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(aspp.apply)(variables, maps))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

    # Channel dropout drops whole maps of an image; plain dropout single values.
    for channel in (True, False):
        kept = hidden_kept(PixelDiscriminator((64,), dropout_rate=0.5, channel_dropout=channel),
                           maps)
        per_map = kept.reshape(2, -1, 64)
        uniform = np.all(per_map == per_map[:, :1], axis=1)
        assert uniform.all() == channel and 0.3 < kept.mean() < 0.7


def hidden_kept(module, maps):
    """Where the hidden layer's dropout kept a value; a large bias keeps every value > 0
    after ReLU, so that a zero can only come from the dropout."""
    variables = module.init(jax.random.key(3), maps)
    variables["params"]["hidden0"]["bias"] = variables["params"]["hidden0"]["bias"] + 100.0
    _, state = module.apply(variables, maps, train=True, rngs={"dropout": jax.random.key(4)},
                            capture_intermediates=True, mutable=["intermediates"])
    found = state["intermediates"]
    hidden = np.asarray(jax.nn.relu(found["hidden0"]["__call__"][0]))
    dropped = np.asarray(found["Dropout_0"]["__call__"][0])
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], 2.0 * hidden[kept], rtol=1e-6)  # scaled by 1/0.5
    return kept


# ----------------------------------------------------------------------------- the losses

def two_way(key, shape):
    """Random 2-way logits (source, target) and the one-logit form the code uses."""
    logits = 2.0 * jax.random.normal(key, (*shape, 2))
    return logits, logits[..., 1:] - logits[..., :1]


def test_losses_match_the_description():
    """docs/methods.md 10.1, with D(z) the 2-way softmax probability of "source"."""
    (two_s, one_s), (two_t, one_t) = (two_way(jax.random.key(i), (2, 5, 7)) for i in (0, 1))
    p_s, p_t = (F.softmax(torch.from_numpy(np.array(x)), dim=-1)[..., 0] for x in (two_s, two_t))
    log, mean = torch.log, torch.mean
    d_loss = -mean(log(p_s)) - mean(log(1 - p_t))
    expected = {
        "gan": -mean(log(p_t)),
        "confusion": -sum(mean(0.5 * log(p) + 0.5 * log(1 - p)) for p in (p_s, p_t)),
        "minimax": -d_loss,
    }
    terms = adversarial.d_loss_terms(one_s, one_t)
    np.testing.assert_allclose(float(terms["source"] + terms["target"]), float(d_loss), rtol=1e-5)
    for kind, value in expected.items():
        np.testing.assert_allclose(float(adversarial.mapping_loss(kind, one_s, one_t)),
                                   float(value), rtol=1e-5, err_msg=kind)
    accuracy = 0.5 * ((p_s >= 0.5).float().mean() + (p_t < 0.5).float().mean())
    np.testing.assert_allclose(float(adversarial.d_accuracy(one_s, one_t)), float(accuracy))


def as_torch(x):
    return torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())


@pytest.mark.slow  # compiles whole networks' gradients
def test_encoder_losses_match_pytorch_transcriptions():
    """FCAN's RAN (tied): 5 x CE - D's loss, D the ASPP discriminator on fc7; ADDA (untied):
    -log D(M_t(x_t)), D the pixel discriminator on M_t's fc7 against M_s's."""
    batch, key = learnable_batch(), jax.random.key(3)
    labels = torch.from_numpy(np.asarray(batch["source_label"]).astype(np.int64))
    for variant in ("fcan_ran", "adda"):
        method, states, _ = built(variant)
        parts = adversarial.build_parts(variant_config(variant))
        variables = states["f"].variables(with_scores(states["f"].params))
        source_variables = None if parts.tied else states["f_source"].variables()
        loss, (terms, _) = adversarial.s_loss(parts, variables, source_variables,
                                              states["d"].params, batch, key)
        outputs = {domain: adversarial.encode(parts, variables, batch[f"{domain}_image"],
                                              methods.base.f_dropout_key(key, domain))[0]
                   for domain in ("source", "target")}
        d_params = states["d"].params
        if variant == "fcan_ran":
            forward = torch_aspp(d_params)
            out_s, out_t = (forward(as_torch(outputs[x]["fc7"])) for x in ("source", "target"))
            d_loss = (F.binary_cross_entropy_with_logits(out_s, torch.zeros_like(out_s))
                      + F.binary_cross_entropy_with_logits(out_t, torch.ones_like(out_t)))
            ce = F.cross_entropy(as_torch(outputs["source"]["score"]), labels, ignore_index=255)
            expected = 5.0 * ce - d_loss
        else:
            reference = torch_pixel_discriminator(256, (64, 32))
            load_convs(d_params, ["hidden0", "hidden1", "classifier"],
                       [m for m in reference if isinstance(m, torch.nn.Conv2d)])
            target_fc7 = as_torch(outputs["target"]["fc7"])
            p_source = F.softmax(reference(target_fc7), dim=1)[:, 0]
            expected = -torch.mean(torch.log(p_source))
        np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-4, err_msg=variant)
        assert float(terms["gate_open"]) == 1.0


# ----------------------------------------------------------------------------- the updates

@pytest.mark.slow  # compiles whole networks' gradients
def test_each_update_changes_its_own_network_and_no_other():
    """Tied (FCAN's RAN, alternating): S and D both learn. Untied (ADDA, simultaneous): the
    target encoder learns, C and the source network stay as they were."""
    batch, key = learnable_batch(), jax.random.key(1)
    for variant, networks in (("fcan_ran", ["f", "d"]), ("adda", ["f", "d", "f_source"])):
        method, states, compiled = built(variant)
        assert list(states) == list(method.networks) == networks
        assert list(method.updates) == ["f", "d"]
        new, metrics = compiled.step(states, batch, key)
        f_own, _ = compiled.updates["f"](states, batch, key)
        assert_trees_equal(f_own, new["f"])  # S's update runs first in both modes
        d_from = {**states, "f": new["f"]} if method.mode == "alternating" else states
        assert_trees_equal(compiled.updates["d"](d_from, batch, key)[0], new["d"])
        assert changed_fraction(states["d"].params, new["d"].params) == 1.0
        assert all(np.isfinite(float(v)) for v in metrics.values())
        classifier = {k: v for k, v in states["f"].params.items() if k.startswith("score")}
        encoder = {k: v for k, v in states["f"].params.items() if not k.startswith("score")}
        new_classifier = {k: new["f"].params[k] for k in classifier}
        new_encoder = {k: new["f"].params[k] for k in encoder}
        assert changed_fraction(encoder, new_encoder) > 0.5
        if variant == "adda":
            assert_trees_equal(classifier, new_classifier)  # C fixed
            assert_trees_equal(states["f_source"], new["f_source"])  # M_s fixed
            assert_trees_equal(states["f_source"].params, states["f"].params)  # M_t = M_s at 0
            assert metrics["f/adv"] > 0 and "f/seg" not in metrics
        else:
            assert changed_fraction(classifier, new_classifier) == 1.0


def grads_of_s_loss(variant, d_params=None, **fields):
    _, states, _ = built(variant)
    parts = adversarial.build_parts(variant_config(variant, **fields))
    source = None if parts.tied else states["f_source"].variables()
    d_params = states["d"].params if d_params is None else d_params
    return jax.jit(jax.grad(lambda p: adversarial.s_loss(
        parts, states["f"].variables(p), source, d_params, learnable_batch(),
        jax.random.key(1))[0]))(with_scores(states["f"].params))


@pytest.mark.slow  # compiles whole networks' gradients
def test_d_gate_and_the_source_term():
    """ADDA's safeguards: a closed gate (D's accuracy at or below d_gate) removes the adversarial
    gradient; the source term gives one of its own."""
    _, states, _ = built("adda")
    parts = adversarial.build_parts(variant_config("adda"))
    _, (metrics, _) = adversarial.s_loss(parts, states["f"].variables(),
                                         states["f_source"].variables(), states["d"].params,
                                         learnable_batch(), jax.random.key(1))
    accuracy = float(metrics["d_accuracy"])
    assert 0.0 < accuracy < 0.95
    nonzero = lambda grads: any(float(jnp.max(jnp.abs(g))) > 0  # noqa: E731
                                for g in jax.tree.leaves(grads))
    assert nonzero(grads_of_s_loss("adda", d_gate=0.0))
    assert not nonzero(grads_of_s_loss("adda", d_gate=0.95))  # closed: no gradient at all
    assert nonzero(grads_of_s_loss("adda", d_gate=0.95, seg_weight=1.0))  # the source term


def test_untied_training_starts_both_encoders_from_the_imported_f(monkeypatch):
    """config.init's F becomes M_t and the fixed M_s, as separate buffers (the compiled step
    donates every state's arrays)."""
    config = variant_config("adda")
    config.init.f_workdir = "runs/pretrained"
    method, states, _ = built("adda")
    saved = methods.build(config).init(jax.random.key(9))["f"].variables()
    monkeypatch.setattr(programs.checkpoint, "read_network",
                        lambda workdir, name, step: (7, saved))
    imported = programs._import_weights(config, method, states)
    for name in ("f", "f_source"):
        assert_trees_equal(imported[name].params, saved["params"])
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}  # noqa
    assert not pointers(imported["f"].params) & pointers(imported["f_source"].params)
    assert trees_differ(imported["f"].params, states["f"].params)


@pytest.mark.slow  # compiles whole networks' gradients
def test_losses_fall_when_overfitting_a_batch():
    _, states, compiled = built("fcan_ran")
    batch = learnable_batch()
    history = []
    for i in range(30):
        states, metrics = compiled.step(states, batch, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["f/seg"] <= 0.5 * history[0]["f/seg"], [h["f/seg"] for h in history]
    # Against S's reversal D need not win; with S fixed, it learns to tell the two domains'
    # colours apart.
    d_history = []
    for i in range(30):
        d, metrics = compiled.updates["d"](states, batch, jax.random.key(i))
        states = {**states, "d": d}
        d_history.append(float(metrics["loss"]))
    assert d_history[-1] < 0.85 * d_history[0], d_history  # (Adam at ADDA's 2e-4)


@pytest.mark.slow
def test_compiled_gradients_match_float64():
    """The encoder's and D's gradients of ADDA and of FCAN's RAN, compiled, against float64."""
    batch, key = learnable_batch(), jax.random.key(1)
    for variant in ("adda", "fcan_ran"):
        _, states, _ = built(variant)

        def grads(dtype):
            parts = adversarial.build_parts(variant_config(variant))
            parts = dataclasses.replace(parts, s=parts.s.clone(dtype=dtype),
                                        d=parts.d.clone(dtype=dtype))
            tree = (with_scores(states["f"].params), states["f"].frozen, states["d"].params,
                    states.get("f_source", states["f"]).params, batch)
            if dtype == jnp.float64:
                tree = to_float64(tree)
            s_params, frozen, d_params, source_params, data = tree
            source = None if parts.tied else {"params": source_params, "frozen": frozen}
            f = jax.jit(jax.grad(lambda p: adversarial.s_loss(
                parts, {"params": p, "frozen": frozen}, source, d_params, data, key)[0]))(
                s_params)
            views = [adversarial.d_view(parts, adversarial.encode(
                parts, {"params": s_params, "frozen": frozen}, data[f"{domain}_image"],
                methods.base.f_dropout_key(key, domain))[0]) for domain in ("source", "target")]
            d = jax.jit(jax.grad(lambda p: adversarial.d_loss(parts, p, *views, key)[0]))(
                d_params)
            return {"f": f, "d": d}

        f32 = grads(jnp.float32)
        with jax.enable_x64(True):
            reference = jax.tree.map(np.asarray, grads(jnp.float64))
        for name in f32:
            assert_close(f32[name], reference[name], f"{variant} {name}: float32 against float64")


# ----------------------------------------------------------------------------- FCNs in the Wild

@pytest.fixture(scope="module")
def statistics_file(tmp_path_factory):
    """Size statistics of label maps with blocks of every class, as the command writes them."""
    path = str(tmp_path_factory.mktemp("statistics") / "sizes.json")
    blocks = np.random.default_rng(0).integers(0, CLASSES, (6, 8, 8))
    stats = size_constraints.class_size_statistics(list(blocks.repeat(8, 1).repeat(8, 2)),
                                                   CLASSES)
    size_constraints.save_statistics(path, stats, dataset="test", class_set="cityscapes19")
    return path


@pytest.mark.slow  # compiles whole networks' gradients
def test_fcn_wild_adds_the_size_term_with_the_statistics_of_its_state(statistics_file):
    config = variant_config("fcn_wild", size_statistics=statistics_file)
    method = methods.build(config)
    states = method.init(jax.random.key(0))
    assert list(states) == ["f", "d", "size_statistics"] and method.mode == "alternating"
    stats = size_constraints.load_statistics(statistics_file, CLASSES)
    np.testing.assert_allclose(states["size_statistics"].params["gamma"], stats.gamma,
                               rtol=1e-6)
    assert states["d"].params["hidden1"]["kernel"].shape == (1, 1, 64, 64)  # 1024-1024 / 16

    parts = adversarial.build_parts(config)
    batch, key = learnable_batch(), jax.random.key(2)
    variables = states["f"].variables(with_scores(states["f"].params))
    loss, (terms, _) = adversarial.s_loss(parts, variables, None, states["d"].params, batch,
                                          key, stats)
    without, _ = adversarial.s_loss(dataclasses.replace(parts, size_weight=0.0), variables, None,
                                    states["d"].params, batch, key)
    target = adversarial.encode(parts, variables, batch["target_image"],
                                methods.base.f_dropout_key(key, "target"))[0]["score"]
    size, metrics = size_constraints.size_constraint_loss(target, stats, slack_weight=2.0,
                                                          iterations=100)
    np.testing.assert_allclose(float(loss), float(without) + float(size), rtol=1e-5)
    assert float(terms["size_present_classes"]) == float(metrics["present_classes"]) > 0

    # Inside the compiled step, from the statistics in the state (which nothing trains).
    new, step_metrics = methods.compile_method(method, donate=False).step(states, batch, key)
    assert np.isfinite(float(step_metrics["f/size"]))
    assert float(step_metrics["f/size_violation_after"]) <= float(
        step_metrics["f/size_violation_before"])
    assert_trees_equal(new["size_statistics"], states["size_statistics"])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields, message", [
    ({"d_input": "fc6"}, r"config.adversarial.d_input: expected one of \('features', 'scores'\)"),
    ({"mapping_loss": "wgan"}, r"config.adversarial.mapping_loss: expected one of"),
    ({"discriminator": "patch"}, r"config.adversarial.discriminator: expected one of"),
    ({"d_hidden": ()}, r"config.adversarial.d_hidden=\(\): expected one or more"),
    ({"d_gate": 1.0}, r"config.adversarial.d_gate=1.0: expected D's accuracy threshold"),
    ({"adv_weight": -1.0}, r"config.adversarial.adv_weight=-1.0: expected a number >= 0"),
    ({"tied": True, "seg_weight": 0.0}, r"seg_weight=0 with tied=True"),
    ({"size_weight": 1.0}, r"config.adversarial.size_weight=1.0 needs the source's class size "
                           r"statistics: set config.adversarial.size_statistics"),
    ({"size_weight": 1.0, "size_statistics": "missing.json"}, r"missing.json"),
    ({"size_iterations": 0}, r"config.adversarial.size_iterations=0: expected a number"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        methods.build(variant_config("adda", **fields))
