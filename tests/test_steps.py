"""LSD's D, G and F updates and the source-only update: who they change, where gradients flow,
modes, composition, keys, and the recorded runs the methods must reproduce.

Tiny widths and 64x64 images; compiled functions are built once per module and reused.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from lsd_jax import methods
from lsd_jax.methods import lsd, source_only
from lsd_jax.models.layers import bilinear_kernel

SIZE, BATCH, CLASSES = 64, 2, 19


def small_config(**overrides):
    config = default.get_config()
    config.model.width = 1 / 16
    config.optim.f_lr = 1e-3
    config.optim.gd_lr = 1e-3
    for dotted, value in overrides.items():
        node = config
        *path, leaf = dotted.split(".")
        for name in path:
            node = node[name]
        node[leaf] = value
    return config


def learnable_batch(seed=0):
    """16x16 blocks of four classes; each class has its own colour, so F can learn it."""
    rng = np.random.default_rng(seed)
    classes = np.array([0, 2, 10, 13])
    blocks = rng.choice(classes, (2 * BATCH, SIZE // 16, SIZE // 16))
    labels = blocks.repeat(16, axis=1).repeat(16, axis=2)
    palette = rng.random((CLASSES, 3)).astype(np.float32)
    image01 = np.clip(palette[labels] + 0.05 * rng.standard_normal(labels.shape + (3,)), 0, 1)
    image01 = image01.astype(np.float32)
    image = image01 * 255 - np.array([104.0, 117.0, 123.0], np.float32)
    labels[:, :2] = 255  # a few ignored rows
    return {
        "source_image": jnp.asarray(image[:BATCH]),
        "source_image01": jnp.asarray(image01[:BATCH]),
        "source_label": jnp.asarray(labels[:BATCH], jnp.int32),
        "target_image": jnp.asarray(image[BATCH:][..., ::-1] * 0.5),
        "target_image01": jnp.asarray(image01[BATCH:][..., ::-1]),
    }


@functools.cache
def compiled(mode="alternating", method="lsd"):
    return methods.compile_method(
        methods.build(small_config(update_mode=mode, method=method)), donate=False)


@functools.cache
def setup():
    """LSD's method, fresh states and compiled updates ("alternating")."""
    method = methods.build(small_config())
    return method, method.init(jax.random.key(0)), compiled()


def composed(mode):
    return compiled(mode).step


def separate(mode, states, batch, key):
    return compiled(mode).separate_step(states, batch, key)


def changed_fraction(before, after):
    flags = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))
    return sum(flags) / len(flags)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def trees_differ(a, b):
    return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b)))


@pytest.mark.slow  # compiles whole networks' gradients
def test_each_update_changes_its_own_network_and_no_other():
    """About 80 s: compiles LSD's D, G and F updates and the composed iteration."""
    _, s, u = setup()
    batch, key = learnable_batch(), jax.random.key(1)
    d_state, d_metrics = u.updates["d"](s, batch, key)
    g_state, g_metrics = u.updates["g"](s, batch, key)
    f_state, f_metrics = u.updates["f"](s, batch, key)
    # Every parameter of the updated network moves (all of them receive gradient) ...
    assert changed_fraction(s["d"].params, d_state.params) == 1.0
    assert changed_fraction(s["g"].params, g_state.params) == 1.0
    assert changed_fraction(s["f"].params, f_state.params) == 1.0
    # ... and each update returns its own network's state only, with its own optimizer state.
    assert jax.tree.structure(d_state) == jax.tree.structure(s["d"])
    assert jax.tree.structure(g_state) == jax.tree.structure(s["g"])
    assert jax.tree.structure(f_state) == jax.tree.structure(s["f"])
    # In the composed iteration, likewise: all three change, nothing else is returned.
    new, _ = composed("alternating")(s, batch, key)
    for before, after in ((s["d"], new["d"]), (s["g"], new["g"]), (s["f"], new["f"])):
        assert changed_fraction(before.params, after.params) == 1.0
    for metrics in (d_metrics, g_metrics, f_metrics):
        assert all(np.isfinite(float(v)) for v in metrics.values())


@functools.cache
def loss_gradients(adversarial: bool = True):
    """Compiled dF-loss/dF-params and dseg/dF-params; everything is an argument (no constants)."""
    nets = lsd.build_networks(small_config() if adversarial else small_config(
        **{"loss.adv_weight": 0.0, "loss.c_weight": 0.0}))

    def f_grads(f_params, frozen, g_params, d_params, batch, key):
        keys = lsd.DropoutKeys.from_step_key(key)
        return jax.grad(lambda p: lsd.f_loss(nets, p, frozen, g_params, d_params, batch,
                                               keys)[0])(f_params)

    def seg_grads(f_params, frozen, batch, key):
        keys = lsd.DropoutKeys.from_step_key(key)
        return jax.grad(lambda p: source_only.source_only_loss(
            nets.f, nets.weights.reduction, {"params": p, "frozen": frozen}, batch,
            keys.f_source)[0])(f_params)
    return jax.jit(f_grads), jax.jit(seg_grads)


@pytest.mark.slow  # compiles whole networks' gradients
def test_no_gradient_reaches_the_frozen_transposed_convs():
    _, s, _ = setup()
    batch, key = learnable_batch(), jax.random.key(1)
    f_grads, _ = loss_gradients()
    grads = f_grads(s["f"].params, s["f"].frozen, s["g"].params, s["d"].params, batch, key)
    assert not any("upscore" in name for name in grads)
    new, _ = composed("alternating")(s, batch, key)
    for name, k, _ in (("upscore2", 4, 2), ("upscore_pool4", 4, 2), ("upscore8", 16, 8)):
        np.testing.assert_array_equal(new["f"].frozen[name], bilinear_kernel(CLASSES, k))


def assert_trees_close(a, b):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.slow  # compiles whole networks' gradients
def test_adversarial_terms_reach_f_only_through_g():
    _, s, _ = setup()
    batch, key = learnable_batch(), jax.random.key(1)
    f_grads, seg_grads = loss_gradients()
    seg_only = seg_grads(s["f"].params, s["f"].frozen, batch, key)
    # With G as it is, the adversarial terms change F's gradient ...
    assert trees_differ(f_grads(s["f"].params, s["f"].frozen, s["g"].params, s["d"].params, batch, key),
                        seg_only)
    # ... zero the adversarial weights and F's gradient is the segmentation gradient ...
    no_adv_grads, _ = loss_gradients(adversarial=False)
    assert_trees_close(no_adv_grads(s["f"].params, s["f"].frozen, s["g"].params, s["d"].params, batch, key),
                       seg_only)
    # ... and so it is when G ignores F's features (its three inputs cut), adversarial on.
    cut = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[0].key in ("up1", "up3", "up4") else x,
        s["g"].params)
    assert_trees_close(f_grads(s["f"].params, s["f"].frozen, cut, s["d"].params, batch, key), seg_only)


@pytest.mark.slow  # compiles whole networks' gradients
def test_composed_step_on_a_fixed_batch_halves_the_segmentation_loss():
    _, s, _ = setup()
    batch, step = learnable_batch(), composed("alternating")
    seg = []
    for i in range(40):
        s, metrics = step(s, batch, jax.random.key(i))
        seg.append(float(metrics["f/seg"]))
    assert all(np.isfinite(seg))
    assert min(seg[-5:]) <= 0.5 * seg[0], seg


@pytest.mark.slow  # compiles whole networks' gradients
@pytest.mark.parametrize("mode", methods.base.UPDATE_MODES)
def test_separate_and_composed_runs_are_identical(mode):
    """15-40 s: compiles the iteration in each mode, as one program and as three (the three
    updates come from the compilation cache when the other mode compiled them)."""
    _, s, _ = setup()
    batch, key = learnable_batch(), jax.random.key(7)
    a, metrics_a = separate(mode, s, batch, key)
    b, metrics_b = composed(mode)(s, batch, key)
    assert_trees_equal(a, b)
    assert_trees_equal(metrics_a, metrics_b)


@pytest.mark.slow  # compiles whole networks' gradients
def test_each_update_sees_the_states_its_mode_promises():
    """In a simultaneous iteration every network's new state is its update applied to the
    iteration's initial states, whatever the updates before it changed; in an alternating one,
    to the states the updates before it left. Checked network by network against the
    separately compiled updates (the same programs as test_separate_and_composed_runs_are_
    identical, from the module's cache)."""
    _, s, _ = setup()
    batch, key = learnable_batch(), jax.random.key(7)
    for mode in methods.base.UPDATE_MODES:
        programs = compiled(mode)
        new, _ = programs.step(s, batch, key)
        left = dict(s)
        for name, update in programs.updates.items():
            expected, _ = update(left if mode == "alternating" else s, batch, key)
            assert_trees_equal(new[name], expected)
            left[name] = expected


@pytest.mark.slow  # compiles whole networks' gradients
def test_alternating_and_simultaneous_differ():
    _, s, _ = setup()
    batch, key = learnable_batch(), jax.random.key(7)
    alt, alt_metrics = composed("alternating")(s, batch, key)
    sim, sim_metrics = composed("simultaneous")(s, batch, key)
    # D steps first in both, from the same parameters: identical.
    assert_trees_equal(alt["d"], sim["d"])
    # G and F see the updated D (and G) only when alternating.
    assert trees_differ(alt["g"].params, sim["g"].params)
    assert trees_differ(alt["f"].params, sim["f"].params)
    assert float(alt_metrics["g/loss"]) != float(sim_metrics["g/loss"])


@pytest.mark.slow  # compiles whole networks' gradients
def test_same_key_same_result_and_another_key_another():
    _, s, _ = setup()
    batch, step = learnable_batch(), composed("alternating")
    first, _ = step(s, batch, jax.random.key(3))
    again, _ = step(s, batch, jax.random.key(3))
    other, _ = step(s, batch, jax.random.key(4))
    assert_trees_equal(first, again)
    assert trees_differ(first["f"].params, other["f"].params)  # other dropout masks


@pytest.mark.slow  # compiles whole networks' gradients
def test_source_only_trains_f_alone_from_lsds_initial_f():
    method = methods.build(small_config(method="source_only"))
    s, u = method.init(jax.random.key(0)), compiled(method="source_only")
    assert list(s) == list(method.networks) == ["f"] and not method.reads_target
    # One seed, one initial F for every method.
    assert_trees_equal(s["f"], setup()[1]["f"])
    batch = learnable_batch()
    f_state, metrics = u.updates["f"](s, batch, jax.random.key(1))
    # Score layers start at zero, so only they move on the first step.
    assert trees_differ(s["f"].params["score_fr"], f_state.params["score_fr"])
    assert set(metrics) == {"loss", "seg", "grad_norm"}
    # It needs no target images.
    source = {k: v for k, v in batch.items() if k.startswith("source") and "01" not in k}
    new, step_metrics = u.step(s, source, jax.random.key(1))
    assert_trees_equal(new["f"], f_state)
    assert set(step_metrics) == {"f/loss", "f/seg", "f/grad_norm"}


def test_f_biases_learn_at_twice_the_rate_and_the_rate_decays():
    config = small_config(**{"optim.f_lr": 1e-3, "optim.lr_decay_steps": 3})
    tx = methods.base.f_optimizer(config.optim)
    params = {"conv": {"kernel": jnp.zeros((2,)), "bias": jnp.zeros((2,))}}
    grads = {"conv": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    state = tx.init(params)
    steps_taken = []
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
        steps_taken.append((float(updates["conv"]["kernel"][0]), float(updates["conv"]["bias"][0])))
    # Adam's first steps move by ~lr per unit gradient.
    np.testing.assert_allclose(steps_taken[0], (-1e-3, -2e-3), rtol=1e-4)
    np.testing.assert_allclose(steps_taken[3], (-1e-4, -2e-4), rtol=1e-4)  # after 3 steps: x0.1
    schedule = methods.base.f_learning_rate_schedule(default.get_config().optim)
    assert float(schedule(23_799)) == pytest.approx(1e-5)
    assert float(schedule(23_800)) == pytest.approx(1e-6)


def test_g_and_d_use_adam_with_the_reference_betas():
    optim = default.get_config().optim
    assert (optim.gd_lr, optim.gd_b1, optim.gd_b2) == (1e-4, 0.7, 0.999)
    assert (optim.f_lr, optim.f_b1, optim.f_b2, optim.f_bias_lr_mult) == (1e-5, 0.9, 0.999, 2.0)


@pytest.mark.parametrize("field, value, message", [
    ("update_mode", "alternate", "update_mode"),
    ("method", "lsd_plus", "config.method"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("loss.reduction", "avg", "config.loss.reduction"),
])
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        methods.build(small_config(**{field: value}))


def test_bad_batches_are_named():
    _, s, u = setup()
    batch, key = learnable_batch(), jax.random.key(0)
    args = lambda b: (s, b, key)  # noqa: E731
    with pytest.raises(ValueError, match="missing"):
        u.updates["d"](*args({k: v for k, v in batch.items() if k != "target_image01"}))
    with pytest.raises(ValueError, match="multiple of 32"):
        u.updates["d"](*args({k: (v[:, :48] if v.ndim > 2 else v) for k, v in batch.items()}))
    with pytest.raises(ValueError, match="source_label"):
        u.updates["d"](*args({**batch, "source_label": batch["source_label"][:, :, :32]}))
    with pytest.raises(ValueError, match="integer"):
        u.updates["d"](*args({**batch, "source_label": batch["source_label"].astype(jnp.float32)}))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        u.updates["d"](*args({**batch, "source_image": batch["source_image"][..., :2]}))
    with pytest.raises(ValueError, match="update mode"):
        methods.run_iteration(u.updates, "alternate", s, batch, key)


# ----------------------------------------------------------------------------- recorded runs

# Losses and parameters of three LSD iterations (each update mode) and three source-only
# updates, recorded from the code before the methods moved into lsd_jax/methods (commit
# 2d3c84b): the moved code must reproduce them (the same losses, keys, optimizers and order of
# updates). In float64: in float32, XLA:CPU's rounding differs from one compilation (and machine
# load) to the next, and Adam turns the rounding noise of near-zero gradients into whole
# learning-rate steps, so float32 parameters after three steps differ by up to ~100% of a
# small tensor between two runs of one program. Re-record only for a deliberate change of the
# method, with LSD_JAX_RECORD=1 pytest tests/test_steps.py -k recorded. Re-recorded once since:
# when Im2ColConv's (fc6, fc7) initial values became float32 draws under jax_enable_x64, as
# nn.Conv's are; with only that undone, the code of that commit (conv1_1 as an im2col
# product) reproduced the earlier recording within 1e-9.
RECORDED = os.path.join(os.path.dirname(__file__), "recorded", "lsd_iterations.json")
RECORDED_RTOL = 1e-9  # the moved code reproduces them exactly here; room for another CPU
# D's stem and residual convolutions feed instance normalisation, which removes any constant
# per channel: their biases' exact gradient is zero, and what Adam makes of the float64
# rounding noise in its place (steps of lr * noise / eps) depends on the CPU's rounding. On
# another machine they came out 2.7e-6 apart (relative); every other value agreed within 1e-9.
ZERO_GRADIENT_RTOL = 1e-4


def has_zero_gradient(net: str, name: str) -> bool:
    """D's conv biases that feed instance normalisation (not out_s / out_c's)."""
    return (net == "d" and name.endswith("['bias']")
            and not name.startswith(("['out_s']", "['out_c']")))


def fingerprint(params) -> dict:
    """Per parameter tensor: its sum, its sum of squares, and its first and last 3 elements."""
    prints = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat = np.asarray(leaf, np.float64).ravel()
        prints[jax.tree_util.keystr(path)] = [flat.sum(), (flat * flat).sum(), *flat[:3],
                                              *flat[-3:]]
    return prints


def to_float64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def recorded_runs() -> dict:
    """The runs in float64 (call with jax.enable_x64)."""
    batch = to_float64(learnable_batch())
    runs = {}
    for method, mode in [("lsd", m) for m in methods.base.UPDATE_MODES] + [
            ("source_only", "alternating")]:
        built = methods.build(small_config(
            method=method, update_mode=mode, **{"model.dtype": "float64"}))
        states = to_float64(built.init(jax.random.key(0)))
        # The updates compiled one by one: both LSD modes run the same three programs (the
        # composed step equals them exactly: test_separate_and_composed_runs_are_identical).
        step = methods.compile_method(built, donate=False).separate_step
        losses = []
        for i in range(3):
            states, metrics = step(states, batch, jax.random.fold_in(jax.random.key(11), i))
            # The source-only update's metrics were recorded without the network prefix.
            losses.append({(k.removeprefix("f/") if method == "source_only" else k): float(v)
                           for k, v in metrics.items()})
        runs["source_only" if method == "source_only" else f"lsd_{mode}"] = {
            "metrics": losses, **{name: fingerprint(state.params)
                                  for name, state in states.items()}}
    return runs


@pytest.mark.slow  # compiles whole networks' gradients
def test_lsd_and_source_only_reproduce_their_recorded_runs():
    """About 95 s: compiles LSD's three float64 updates (shared by both modes) and
    source-only's, and runs three iterations of each (float64: see RECORDED above)."""
    with jax.enable_x64(True):
        runs = recorded_runs()
    if os.environ.get("LSD_JAX_RECORD") == "1":
        os.makedirs(os.path.dirname(RECORDED), exist_ok=True)
        with open(RECORDED, "w") as f:
            json.dump(runs, f, indent=0, sort_keys=True)
    with open(RECORDED) as f:
        expected = json.load(f)
    assert sorted(runs) == sorted(expected)
    for run, values in expected.items():
        assert [sorted(m) for m in runs[run]["metrics"]] == [sorted(m) for m in values["metrics"]]
        for step, (got, want) in enumerate(zip(runs[run]["metrics"], values["metrics"])):
            for term in want:
                np.testing.assert_allclose(got[term], want[term], rtol=RECORDED_RTOL,
                                           err_msg=f"{run}, step {step + 1}, {term}")
        assert sorted(runs[run]) == sorted(values), run
        for net in set(values) - {"metrics"}:
            assert sorted(runs[run][net]) == sorted(values[net]), (run, net)
            for name, want in values[net].items():
                want = np.asarray(want)
                rtol = ZERO_GRADIENT_RTOL if has_zero_gradient(net, name) else RECORDED_RTOL
                np.testing.assert_allclose(runs[run][net][name], want, rtol=rtol,
                                           atol=rtol * np.abs(want).max(),
                                           err_msg=f"{run}: {net}{name}")
