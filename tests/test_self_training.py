"""Self-training with a mean teacher (lsd_jax/methods/self_training.py): DACS and MIC.

The pieces by hand (the EMA rate and update, ClassMix's masks and labels, the confidence
weight, the pixel-weighted cross-entropy, MIC's masks, the augmentations), the losses' gradients
compiled against eager and float64, and the method as it trains: no gradient reaches the
teacher, the teacher follows the student's new parameters, and a batch is fitted. Exact resume,
the teacher included: test_checkpoint.py. Tiny widths and 32x64 images.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from lsd_jax import losses, methods
from lsd_jax.losses import IGNORE_LABEL
from lsd_jax.methods import augmentation, base, self_training as st, source_only
from test_gradients import assert_close
from test_steps import assert_trees_equal, trees_differ

CLASSES = 19


def dacs_config(variant="dacs_mic", **fields):
    config = default.apply_variant(default.get_config(), variant)
    config.model.width = 1 / 16
    config.model.dropout_rate = 0.0
    config.dacs.optimizer = "lsd_adam"   # Adam fits a batch in a few steps from He init
    config.optim.f_lr = 1e-3
    config.dacs.mic_block_size = 8
    # A tiny F from He initialisation is never 96.8% sure within a test's few steps: at 0.3
    # the teacher's confident fraction, and with it the pseudo-labelled terms, move.
    config.dacs.confidence_threshold = 0.3
    config.dacs.update(fields)
    return config


def batch(seed=0, n=2, height=32, width=64):
    """Source and target images of coloured class blocks (the target's colours swapped)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 2, 10, 13], (2 * n, height // 8, width // 8))
    labels = labels.repeat(8, axis=1).repeat(8, axis=2)
    palette = rng.random((CLASSES, 3)).astype(np.float32)
    image01 = np.clip(palette[labels] + 0.05 * rng.standard_normal(labels.shape + (3,)), 0, 1)
    image = augmentation.f_view(jnp.asarray(image01, jnp.float32))
    labels[:, :2] = IGNORE_LABEL
    return {"source_image": image[:n], "source_label": jnp.asarray(labels[:n], jnp.int32),
            "target_image": image[n:, :, :, ::-1]}


@functools.cache
def built(variant="dacs_mic"):
    method = methods.build(dacs_config(variant))
    return method, method.init(jax.random.key(0)), methods.compile_method(method, donate=False)


# ----------------------------------------------------------------------------- the teacher

def test_ema_rate_warms_up_to_alpha():
    rates = [float(st.ema_rate(jnp.int32(t), 0.99)) for t in (0, 1, 2, 3, 98, 99, 1000)]
    np.testing.assert_allclose(rates, [0.0, 0.5, 2 / 3, 0.75, 98 / 99, 0.99, 0.99], rtol=1e-6)


def test_ema_update_averages_parameters_only_and_counts():
    student = base.NetState({"w": jnp.array([1.0, 2.0])}, None, {"k": jnp.array([5.0])},
                            {"mean": jnp.array([7.0])})
    teacher = base.NetState({"w": jnp.array([3.0, -2.0])}, base.AverageCount(jnp.int32(3)),
                            {"k": jnp.array([0.0])}, {"mean": jnp.array([1.0])})
    new, metrics = st.ema_update(0.99, teacher, student)
    # t = 3: rate min(1 - 1/4, 0.99) = 0.75.
    np.testing.assert_allclose(new.params["w"], [0.75 * 3 + 0.25 * 1, 0.75 * -2 + 0.25 * 2])
    assert float(metrics["alpha"]) == 0.75 and int(new.opt_state.count) == 4
    assert_trees_equal((new.frozen, new.batch_stats), (teacher.frozen, teacher.batch_stats))
    # The first update makes the teacher the student; a copy starts at count 0.
    first, _ = st.ema_update(0.99, base.average_copy(student), student)
    assert_trees_equal(first.params, student.params)


@pytest.mark.slow  # compiles the student's update
def test_the_teacher_follows_the_students_new_parameters_and_no_gradient_reaches_it():
    """About 20-30 s: compiles DACS's iteration with MIC (three student passes and their
    gradients, the teacher's pass and update), which the module's other tests then reuse."""
    method, states, compiled = built()
    assert list(method.updates) == ["f", "teacher"] and method.averages_of_f == ("teacher",)
    assert_trees_equal(states["teacher"].params, states["f"].params)
    b, key = batch(), jax.random.key(1)
    first, metrics = compiled.step(states, b, key)
    # Step 0's rate is 0: the teacher is the student the update has just produced.
    assert trees_differ(first["f"].params, states["f"].params)
    assert_trees_equal(first["teacher"].params, first["f"].params)
    second, _ = compiled.step(first, b, jax.random.key(2))
    expected = jax.tree.map(lambda t, s: 0.5 * t + 0.5 * s, first["teacher"].params,
                            second["f"].params)
    assert_trees_equal(second["teacher"].params, expected)
    assert int(second["teacher"].opt_state.count) == 2
    assert {"f/seg", "f/mix", "f/mic", "f/confident", "teacher/alpha"} <= set(metrics)

    # The student's loss as a function of the teacher's parameters: no gradient (the
    # pseudo-labels are constants); as a function of its own: one.
    f, block = method.networks["f"], dacs_config().dacs
    teacher = states["teacher"]
    loss = lambda tp, sp: st.student_loss(f, block, CLASSES, states["f"].variables(sp),  # noqa
                                          teacher.replace(params=tp), b, key)[0]
    to_teacher, to_student = jax.jit(jax.grad(loss, argnums=(0, 1)))(teacher.params,
                                                                       states["f"].params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(to_teacher))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(to_student))


# ----------------------------------------------------------------------------- ClassMix

def test_classmix_takes_whole_classes_half_of_those_present_ignore_label_included():
    label = np.zeros((16, 16), np.int32)
    label[:, 4:8], label[:, 8:12], label[:8, 12:] = 2, 5, 9
    label[8:, 12:] = IGNORE_LABEL       # five values present: 0, 2, 5, 9 and 255
    label = jnp.asarray(label)
    seen = set()
    mask_of = jax.jit(st.classmix_mask, static_argnums=2)  # as trained; 40 eager draws: 2 s
    for i in range(40):
        mask = np.asarray(mask_of(jax.random.key(i), label, CLASSES))
        chosen = {int(v) for v in np.unique(np.asarray(label)[mask])}
        # A union of whole class regions: every pixel of a chosen value, none of the others.
        np.testing.assert_array_equal(mask, np.isin(np.asarray(label), list(chosen)))
        assert len(chosen) == 3         # ceil(5 / 2)
        seen |= chosen
    assert seen == {0, 2, 5, 9, IGNORE_LABEL}  # every value, the ignore label too, is drawn

    # The batch: per image, source pixels and labels where the mask is, target and pseudo-labels
    # elsewhere.
    source01 = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    target01 = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
    labels = jnp.stack([label, jnp.flip(label, 1)])
    pseudo = jnp.full((2, 16, 16), 17, jnp.int32)
    images, mixed, mask = st.classmix(jax.random.key(3), source01, target01, labels, pseudo,
                                      CLASSES)
    mask = np.asarray(mask)
    np.testing.assert_array_equal(images, np.where(mask[..., None], source01, target01))
    np.testing.assert_array_equal(mixed, np.where(mask, labels, 17))
    assert 0 < mask.mean() < 1


def test_confidence_weight_and_weighted_cross_entropy_by_hand():
    confidence = jnp.array([[[0.5, 0.968], [0.99, 0.2]]])
    assert float(st.confident_fraction(confidence, 0.968)) == 0.5
    assert float(st.confidence_weight(confidence, 0.968, "fraction")) == 0.5
    # FixMatch's mask (pseudo_weight="pixel"): each pixel 1 or 0, the crop's rows 0 either way.
    pixel = st.confidence_weight(confidence, 0.968, "pixel")
    np.testing.assert_array_equal(pixel, [[[0.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(st.pseudo_label_weights(pixel, (1, 2, 2), (1, 0)),
                                  [[[0.0, 0.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(st.pseudo_label_weights(jnp.float32(0.5), (1, 2, 2), (0, 1)),
                                  [[[0.5, 0.5], [0.0, 0.0]]])
    wrong = ml_collections.ConfigDict({**dacs_config().dacs.to_dict(), "pseudo_weight": "soft"})
    with pytest.raises(ValueError, match=r"config.dacs.pseudo_weight='soft': expected one of"):
        st.check_block(wrong)

    logits = jnp.array([[[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]]])   # (1, 1, 2, 3)
    labels = jnp.array([[[0, IGNORE_LABEL]]])
    weights = jnp.array([[[0.25, 1.0]]])
    nll = -np.log(np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0)))
    # Mean over both pixels; the ignored one counts with 0.
    np.testing.assert_allclose(float(st.weighted_ce(logits, labels, weights)), 0.25 * nll / 2,
                               rtol=1e-6)


# ----------------------------------------------------------------------------- MIC, augmentation

def test_mic_masks_are_whole_blocks_masked_at_the_ratio():
    keep = np.asarray(st.mic_mask(jax.random.key(0), (8, 256, 256), 8, 0.7))
    blocks = keep.reshape(8, 32, 8, 32, 8)
    assert (blocks == blocks[:, :, :1, :, :1]).all()   # constant on every 8x8 block
    assert abs(keep.mean() - 0.3) < 0.02               # 8,192 blocks, each kept with p 0.3
    # Sizes that are not multiples of the block: the grid is cut at the bottom and right.
    assert st.mic_mask(jax.random.key(1), (2, 40, 50), 16, 0.5).shape == (2, 40, 50)


def test_colour_conversions_and_augmentation_keep_images_in_range():
    rgb = jax.random.uniform(jax.random.key(0), (8, 8, 3))
    # Compiled, as training runs them (op by op, these conversions compile for seconds).
    np.testing.assert_allclose(jax.jit(lambda x: augmentation.hsv_to_rgb(augmentation.rgb_to_hsv(x)))(rgb), rgb,
                               atol=1e-6)
    grey = jnp.full((4, 4, 3), 0.4)
    np.testing.assert_allclose(augmentation.rgb_to_hsv(grey)[..., 1], 0.0)   # no hue, no saturation
    # Zero strength: the jitter is the identity; a blur keeps a constant image.
    np.testing.assert_allclose(jax.jit(augmentation.colour_jitter, static_argnums=2)(
        jax.random.key(1), rgb, 0.0), rgb, atol=1e-6)
    np.testing.assert_allclose(augmentation.gaussian_blur(grey, jnp.float32(0.8), 5), grey, atol=1e-6)
    assert [augmentation.blur_kernel_size(h) for h in (512, 128, 32)] == [51, 13, 3]   # DACS's sizes
    block = dacs_config().dacs
    images = jax.random.uniform(jax.random.key(2), (6, 32, 64, 3))
    augment = jax.jit(lambda key, images: augmentation.strong_augment(key, images, block))
    out = augment(jax.random.key(3), images)
    assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    changed = [bool(jnp.any(jnp.abs(o - i) > 1e-6)) for o, i in zip(out, images)]
    assert any(changed)                                 # each image with its own draws
    np.testing.assert_array_equal(out, augment(jax.random.key(3), images))


def test_sensor_noise_comes_last_with_its_own_draws_and_is_checked():
    """config.dacs.noise_probability (not DACS's, off by default): per-pixel Gaussian noise of
    a std from U(noise_std) after the jitter and blur, which keep their draws."""
    images = 0.25 + 0.5 * jax.random.uniform(jax.random.key(0), (4, 32, 64, 3))  # no clipping
    def augment(key, images, block):
        return jax.jit(lambda key, images: augmentation.strong_augment(key, images, block))(
            key, images)

    plain = dacs_config(jitter_probability=1.0, blur_probability=1.0).dacs
    no_op_noise = dacs_config(jitter_probability=1.0, blur_probability=1.0,
                              noise_probability=1.0, noise_std=(0.0, 0.0)).dacs
    np.testing.assert_array_equal(augment(jax.random.key(1), images, no_op_noise),
                                  augment(jax.random.key(1), images, plain))
    noise_only = dacs_config(jitter_probability=0.0, blur_probability=0.0,
                             noise_probability=1.0, noise_std=(0.05, 0.05)).dacs
    noise = np.asarray(augment(jax.random.key(1), images, noise_only) - images)
    np.testing.assert_allclose(noise.std(axis=(1, 2, 3)), 0.05, rtol=0.05)   # 6,144 draws each
    assert abs(noise.mean()) < 2e-3 and not np.allclose(noise[0], noise[1])
    with pytest.raises(ValueError, match=r"config.dacs.noise_std=\(0.1, 0.05\): expected"):
        augmentation.check_values(dacs_config(noise_std=(0.1, 0.05)).dacs)
    with pytest.raises(ValueError,
                       match=r"config.dacs.noise_probability=2.0: expected a number in \[0.0, 1"):
        augmentation.check_values(dacs_config(noise_probability=2).dacs)


def test_the_pretraining_augmentation_transforms_source_images_only_and_by_the_step_key():
    """config.source_only.augment: DACS's strong transform on the source images (the embedded
    benchmark's pre-training phase), its own draws per image from the step key."""
    b = batch()
    block = dacs_config(jitter_probability=1.0, blur_probability=1.0).dacs
    augment = jax.jit(lambda b, key: source_only.augmented_source(b, key, block))
    out = augment(b, jax.random.key(5))
    assert set(out) == set(b)
    np.testing.assert_array_equal(out["source_label"], b["source_label"])
    np.testing.assert_array_equal(out["target_image"], b["target_image"])
    moved = jnp.abs(out["source_image"] - b["source_image"]).max(axis=(1, 2, 3))
    assert bool(jnp.all(moved > 1.0)), moved          # every image, by more than a grey level
    in01 = augmentation.image01(out["source_image"])
    assert 0 <= float(in01.min()) and float(in01.max()) <= 1
    np.testing.assert_array_equal(out["source_image"], augment(b, jax.random.key(5))["source_image"])
    assert trees_differ(out["source_image"], augment(b, jax.random.key(6))["source_image"])
    # With neither transform drawn, the images come back as they went in.
    off = dacs_config(jitter_probability=0.0, blur_probability=0.0).dacs
    np.testing.assert_allclose(source_only.augmented_source(b, jax.random.key(5), off)
                               ["source_image"], b["source_image"], atol=1e-3)


def test_the_pretraining_augmentation_is_checked_and_reaches_the_update(monkeypatch):
    config = dacs_config("source_only", blur_sigma=(1.0, 0.5))
    config.source_only.augment = True
    with pytest.raises(ValueError, match=r"config.dacs.blur_sigma=\(1.0, 0.5\)"):
        methods.build(config)
    blocks = []
    monkeypatch.setattr(source_only, "augmented_source",
                        lambda b, key, block: blocks.append(block) or b)
    for augment in (False, True):
        config = dacs_config("source_only")
        config.source_only.augment = augment
        method = methods.build(config)
        states = jax.eval_shape(method.init, jax.random.key(0))
        jax.eval_shape(method.updates["f"], states, batch(), jax.random.key(1))
        assert blocks == ([config.dacs] if augment else []), augment


@pytest.mark.slow  # compiles the student's loss three times
def test_dacs_options_augment_the_source_term_and_weigh_each_confident_pixel():
    """About 30 s. config.dacs.augment_source: the source term is the cross-entropy on the
    source images strongly augmented by the step key's stream 8 (computed here by hand), and
    nothing else changes: ClassMix pastes the source pixels as they are (the mixed term is the
    same). config.dacs.pseudo_weight="pixel": the mixed term changes (the teacher is confident
    on part of the pixels) and the source term does not."""
    config = dacs_config("dacs", jitter_probability=1.0, blur_probability=1.0)
    method = methods.build(config)
    states = method.init(jax.random.key(0))
    f, b, key = method.networks["f"], batch(), jax.random.key(2)

    def moved(state, seed):  # the classifier starts at zero (every score equal)
        leaves, tree = jax.tree.flatten(state.params)
        noise = jax.random.split(jax.random.key(seed), len(leaves))
        return state.replace(params=jax.tree.unflatten(tree, [
            p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)]))

    variables, teacher = moved(states["f"], 3).variables(), moved(states["teacher"], 4)
    _, confidence = st.pseudo_labels(f, teacher, b["target_image"])
    threshold = float(jnp.median(confidence))

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def terms(augment_source, pseudo_weight):
        block = config.dacs.copy_and_resolve_references()
        block.augment_source, block.pseudo_weight = augment_source, pseudo_weight
        block.confidence_threshold = threshold
        _, (t, _) = st.student_loss(f, block, CLASSES, variables, teacher, b, key)
        return t

    plain, augmented, pixel = (terms(False, "fraction"), terms(True, "fraction"),
                               terms(False, "pixel"))
    assert float(plain["mix"]) == float(augmented["mix"])
    assert abs(float(plain["seg"]) - float(augmented["seg"])) > 1e-3
    image = augmentation.strongly_augmented(jax.random.fold_in(key, 8), b["source_image"], config.dacs)
    outputs, _ = base.f_outputs(f, variables, image, train=True,
                                key=base.f_dropout_key(key, "source"))
    np.testing.assert_allclose(float(augmented["seg"]),
                               float(losses.ce2d(outputs["score"], b["source_label"], "mean")),
                               rtol=1e-5)
    assert 0 < float(plain["confident"]) < 1 and pixel["confident"] == plain["confident"]
    assert float(pixel["seg"]) == float(plain["seg"])
    assert abs(float(pixel["mix"]) - float(plain["mix"])) > 1e-3
    wrong = ml_collections.ConfigDict({**config.dacs.to_dict(), "augment_source": "yes"})
    with pytest.raises(ValueError, match=r"config.dacs.augment_source='yes': expected True"):
        st.check_block(wrong)


# ----------------------------------------------------------------------------- the losses

def loss_terms(source, mixed, masked, source_label, mixed_label, pseudo, pixel_weight, weight):
    """The student's loss from its three score maps (the rest of the loss is the network)."""
    return (losses.ce2d(source, source_label, "mean")
            + st.weighted_ce(mixed, mixed_label, pixel_weight)
            + st.weighted_ce(masked, pseudo, jnp.full(pseudo.shape, weight)))


def test_loss_gradients_compiled_equal_eager_and_float64():
    keys = jax.random.split(jax.random.key(4), 6)
    shape = (2, 8, 16)
    scores = [3 * jax.random.normal(k, shape + (CLASSES,)) for k in keys[:3]]
    labels = [jnp.where(jax.random.uniform(k, shape) < 0.1, IGNORE_LABEL,
                        jax.random.randint(k, shape, 0, CLASSES)) for k in keys[3:]]
    pixel_weight = jnp.where(jax.random.uniform(keys[0], shape) < 0.5, 1.0, 0.3)
    grad = jax.grad(loss_terms, argnums=(0, 1, 2))
    args = (*scores, *labels, pixel_weight, 0.3)
    compiled = jax.jit(grad)(*args)
    with jax.disable_jit():
        eager = grad(*args)
    with jax.enable_x64(True):
        as64 = [a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
                for a in args[:-1]]
        reference = jax.tree.map(np.asarray, jax.jit(grad)(*as64, 0.3))
    assert_close(compiled, eager, "student loss: jit(grad) against eager")
    assert_close(compiled, reference, "student loss: float32 against float64")


# ----------------------------------------------------------------------------- the method

@pytest.mark.slow  # compiles the student's update
def test_a_batch_is_fitted_and_the_teacher_grows_sure():
    _, states, compiled = built()
    b = batch()
    history = []
    for i in range(25):
        states, metrics = compiled.step(states, b, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[-1]["f/seg"] < 0.5 * history[0]["f/seg"], [h["f/seg"] for h in history]
    # (The mixed term does not fall step by step: it grows as the confident fraction, the
    # pseudo-labelled pixels' weight, rises from 0. Its values are checked by hand above.)
    assert all(np.isfinite(h["f/mix"]) and np.isfinite(h["f/mic"]) for h in history)
    assert all(0 <= h["f/confident"] <= 1 for h in history)
    # The teacher starts uniform (F's score layers start at zero): nothing is confident; it
    # grows sure as it follows the student.
    assert history[0]["f/confident"] == 0 and history[-1]["f/confident"] > 0.5
    assert all(0 < h["f/mixed_source_fraction"] < 1 for h in history)


@pytest.mark.parametrize("fields, message", [
    ({"ema_alpha": 1.0}, r"config.dacs.ema_alpha=1.0: expected a number in \[0.0, 1.0\)"),
    ({"confidence_threshold": 1.5}, r"config.dacs.confidence_threshold=1.5"),
    ({"blur_sigma": (1.0, 0.5)}, r"config.dacs.blur_sigma=\(1.0, 0.5\): expected \(low, high\)"),
    ({"mic_block_size": 0}, r"config.dacs.mic_block_size=0: expected a positive number"),
    ({"mic_weight": -1.0}, r"config.dacs.mic_weight=-1.0"),
    ({"optimizer": "adamw"}, r"config.dacs.optimizer: expected one of"),
    ({"warmup_steps": -1}, r"config.dacs.warmup_steps=-1: expected a number of steps"),
    ({"pseudo_label_crop": (15,)}, r"config.dacs.pseudo_label_crop=\(15,\): expected \(top"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        methods.build(dacs_config(**fields))


def test_simultaneous_mode_and_mismatched_domains_are_refused():
    config = dacs_config()
    config.update_mode = "simultaneous"
    with pytest.raises(ValueError, match=r"config.update_mode='simultaneous': dacs updates its "
                                         r"teacher .* expected 'alternating'"):
        methods.build(config)
    b = batch()
    b["target_image"] = b["target_image"][:, :, :32]
    with pytest.raises(ValueError, match="ClassMix pastes source pixels onto target images"):
        st.check_batch(b)


@pytest.mark.slow  # trains on generated scenes (the resume test's programs: test_checkpoint.py)
def test_each_selection_evaluation_reports_the_teachers_pseudo_label_accuracy(tmp_path):
    """About 20 s: trains two steps on generated scenes and evaluates (the iteration is loaded
    from the compilation cache when test_checkpoint's resume test compiled it first)."""
    from lsd_jax import train
    from test_main import event_tags
    from train_helpers import tiny_config, tiny_programs

    config = tiny_config(str(tmp_path / "tfds"), "dacs_mic")
    config.train.num_steps = config.train.eval_every = 2
    result = train.train_and_evaluate(config, str(tmp_path / "run"),
                                      programs=tiny_programs("dacs_mic"), evaluate_at_end=False)
    [entry] = result.selection
    assert entry["step"] == 2 and 0 <= entry["miou"] <= 1
    assert 0 <= entry["teacher_miou"] <= 1 and 0 < entry["teacher_pixel_accuracy"] <= 1
    scalars, _ = event_tags(str(tmp_path / "run"))
    assert scalars["selection/teacher_miou"] == [pytest.approx(entry["teacher_miou"])]
    assert scalars["selection/teacher_pixel_accuracy"] == [
        pytest.approx(entry["teacher_pixel_accuracy"])]
    assert "selection/miou" in scalars   # the student's, as for every method


@pytest.mark.parametrize("config_file", ["gta", "synthia", "synthetic"])
def test_the_variants_summarise_with_the_teacher_beside_f(config_file):
    """--mode summary's text (shapes only, nothing computed) for :dacs and :dacs_mic."""
    from lsd_jax.summary import model_summary
    from train_helpers import load_config_file

    for variant in ("dacs", "dacs_mic"):
        config = load_config_file(config_file, variant)
        assert config.method == "dacs" and config.update_mode == "alternating"
        assert config.dacs.mic_weight == (1.0 if variant == "dacs_mic" else 0.0)
        text = model_summary(config)
        f_total = re.search(r"^F total: ([\d,]+) parameters", text, re.M).group(1)
        assert re.search(rf"^TEACHER total: {f_total} parameters", text, re.M), text
        assert "TEACHER (FCN8s): parameters (a copy of F's at the start, then their moving " \
               "average; no gradient)" in text


# ----------------------------------------------------------------------------- DAFormer's strategies

def test_warmup_rises_linearly_from_a_millionth_then_leaves_the_schedule_alone():
    """The factor by hand, the logged rates, and the optimiser's actual first steps: SGD with
    momentum (the references') and Adam (LSD's) take the warmed-up rate's step."""
    steps = 1500
    assert float(base.warmup_factor(0, steps)) == pytest.approx(1e-6)
    assert float(base.warmup_factor(750, steps)) == pytest.approx(0.5 + 0.5e-6)
    assert float(base.warmup_factor(1500, steps)) == 1.0 == float(base.warmup_factor(4000, steps))
    for optimizer in ("output_space_sgd", "lsd_adam"):
        plain = dacs_config(optimizer=optimizer)
        warm = dacs_config(optimizer=optimizer, warmup_steps=steps)
        (tx0, rates0), (tx1, rates1) = (st.source_only.optimizer_and_rates(c, "dacs")
                                        for c in (plain, warm))
        for step in (0, 1, 750, 1500, 2000):
            for name, rate in rates0(step).items():
                assert rates1(step)[name] == pytest.approx(
                    rate * float(base.warmup_factor(step, steps)), rel=1e-6), (optimizer, step)
        params = {"score_fr": {"kernel": jnp.ones((2, 2))}, "conv1_1": {"kernel": jnp.ones(3)}}
        grads = jax.tree.map(lambda p: 0.5 * p, params)
        s0, s1 = tx0.init(params), tx1.init(params)
        for step in range(3):  # the same gradients; the warmed-up steps are the factor smaller
            u0, s0 = tx0.update(grads, s0, params)
            u1, s1 = tx1.update(grads, s1, params)
            factor = float(base.warmup_factor(step, steps))
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a * factor, rtol=1e-5),
                         u0, u1)
    plain_tx = base.f_optimizer(dacs_config().optim)
    assert base.with_warmup(plain_tx, 0) is plain_tx   # off: the same transformation


def optimizers(config):
    """(S's or F's optimiser, [the other networks' optimisers]) of a method's config."""
    from lsd_jax.methods import adaptsegnet, adversarial, advent, lsd
    if config.method == "lsd":
        nets = lsd.build_networks(config)
        return nets.f_tx, [nets.g_tx, nets.d_tx]
    if config.method == "adversarial":
        parts = adversarial.build_parts(config)
        return parts.s_tx, [parts.d_tx]
    parts = {"adaptsegnet": adaptsegnet, "advent": advent}[config.method].build_parts(config)
    return parts.s_tx, [parts.d_tx] if parts.d_tx else []


@pytest.mark.parametrize("variant, field", [
    ("adaptsegnet_multi", "adaptsegnet"), ("advent", "advent"), ("minent", "advent"),
    ("lsd", "optim"), ("adda", "optim"), ("grl", "optim")])
def test_every_method_warms_up_s_and_leaves_g_and_d_alone(variant, field):
    """The warmup of the output-space methods (their block), LSD and the adversarial family
    (config.optim): S's (F's) logged rates and its steps (SGD with momentum and weight decay,
    or Adam) are the factor smaller; G's and D's rates and steps are unchanged."""
    steps = 100
    plain = default.apply_variant(default.get_config(), variant)
    warm = default.apply_variant(default.get_config(), variant)
    warm[field].warmup_steps = steps
    (s0, others0), (s1, others1) = optimizers(plain), optimizers(warm)
    r0, r1 = methods.build(plain).learning_rates, methods.build(warm).learning_rates
    for step in (0, 1, 50, 100, 200):
        factor = float(base.warmup_factor(step, steps))
        for name, rate in r0(step).items():
            expected = rate * factor if name.startswith("lr/f") else rate
            assert r1(step)[name] == pytest.approx(expected, rel=1e-6), (name, step)
    params = {"classifier": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "conv1": {"kernel": jnp.ones(3), "bias": jnp.ones(1)}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    pairs = [(s0, s1, True)] + [(a, b, False) for a, b in zip(others0, others1)]
    assert len(pairs) == {"lsd": 3, "minent": 1}.get(variant, 2)
    for tx0, tx1, warmed in pairs:
        s0, s1 = tx0.init(params), tx1.init(params)
        for step in range(3):
            u0, s0 = tx0.update(grads, s0, params)
            u1, s1 = tx1.update(grads, s1, params)
            factor = float(base.warmup_factor(step, steps)) if warmed else 1.0
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a * factor, rtol=1e-5),
                         u0, u1)
    warm[field].warmup_steps = -1
    with pytest.raises(ValueError, match=rf"config.{field}.warmup_steps=-1: expected"):
        methods.build(warm)


def test_the_pseudo_label_crop_zeroes_the_top_and_bottom_rows():
    weights = np.asarray(st.pseudo_label_weights(jnp.float32(0.7), (2, 10, 4), (2, 3)))
    assert weights.shape == (2, 10, 4)
    np.testing.assert_array_equal(weights[:, :2], 0.0)
    np.testing.assert_array_equal(weights[:, -3:], 0.0)
    np.testing.assert_allclose(weights[:, 2:7], 0.7)
    np.testing.assert_allclose(np.asarray(st.pseudo_label_weights(jnp.float32(0.7), (1, 4, 2),
                                                                  (0, 0))), 0.7)


@pytest.mark.slow  # the student's whole loss, op by op
def test_the_pseudo_label_crop_reaches_the_loss():
    """About 11 s. With every row cropped, the pseudo-labelled pixels of the mixed image (and
    MIC's whole masked term) weigh nothing, the source pixels still do."""
    config = dacs_config(mic_weight=1.0, pseudo_label_crop=(0, 64))
    method = methods.build(config)
    states = method.init(jax.random.key(0))
    f = method.networks["f"]
    _, (terms, _) = st.student_loss(f, config.dacs, config.num_classes,
                                    states["f"].variables(), states["teacher"], batch(),
                                    jax.random.key(2))
    assert float(terms["mic"]) == 0.0 and float(terms["mix"]) > 0.0


def test_the_published_dacs_settings():
    """configs/gta_deeplab.py:dacs and synthia_deeplab.py:dacs against DACS's numbers."""
    from train_helpers import load_config_file

    for name, source_size in (("gta_deeplab", (720, 1280)), ("synthia_deeplab", (760, 1280))):
        config = load_config_file(name, "dacs")
        assert config.method == "dacs" and config.update_mode == "alternating"
        assert config.model.backbone == "deeplabv2_resnet101" and config.model.aspp_branches == 2
        data = config.data
        assert data.batch_size == 2 and tuple(data.source.resize) == source_size
        assert tuple(data.source.crop) == tuple(data.target.crop) == (512, 512)
        assert not data.source.flip and not data.target.flip
        assert data.target.name == "cityscapes_extracted/1024x512"
        assert config.train.num_steps == 250_000
        assert config.dacs.optimizer == "output_space_sgd" and config.dacs.ema_alpha == 0.99
        assert config.dacs.confidence_threshold == 0.968 and config.dacs.mic_weight == 0.0
        block = config.adaptsegnet
        assert (block.s_lr, block.classifier_lr_mult, block.momentum, block.weight_decay,
                block.poly_power, block.poly_steps) == (2.5e-4, 10.0, 0.9, 5e-4, 0.9, 250_000)
        _, rates = st.source_only.optimizer_and_rates(config, "dacs")
        assert rates(0) == {"lr/f": pytest.approx(2.5e-4), "lr/f_classifier": pytest.approx(2.5e-3)}
        assert rates(125_000)["lr/f"] == pytest.approx(2.5e-4 * 0.5 ** 0.9)
        methods.build(config)  # the method accepts it


def test_feature_distance_labels_mask_and_an_empty_mask():
    """DAFormer's downscaled labels (a cell takes a class covering 3/4 of its patch) and the
    distance's mean over the cells of the chosen classes, by hand; no such cell gives 0."""
    labels = np.full((1, 4, 4), 0, np.int32)
    labels[0, :2, :2] = 13                     # a whole 2x2 patch of car
    labels[0, :2, 2:] = [[13, 13], [13, 2]]    # 3/4 car: still car
    labels[0, 2:, :2] = [[13, 13], [2, 2]]     # 1/2 car: ignored
    labels[0, 2:, 2:] = IGNORE_LABEL           # unlabelled: ignored
    small = np.asarray(st.downscale_labels(jnp.asarray(labels), 2, CLASSES))
    np.testing.assert_array_equal(small, [[[13, 13], [IGNORE_LABEL, IGNORE_LABEL]]])
    # A ceil-mode DeepLab map one cell larger (H/8 + 1): its border cells are ignored.
    big = np.zeros((1, 16, 24), np.int32) + 13
    cells = np.asarray(st.labels_of_features(jnp.asarray(big), (3, 4), CLASSES))
    np.testing.assert_array_equal(cells[0, :2, :3], 13)
    assert (cells[0, 2] == IGNORE_LABEL).all() and (cells[0, :, 3] == IGNORE_LABEL).all()

    student = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0]))
    imagenet = jnp.zeros((1, 2, 2, 3))
    things = jnp.asarray([13])
    # Cells (0, 0) at distance 5 and (0, 1) at 0 are cars: mean 2.5; the others do not count.
    student = student.at[0, 1, 1].set(100.0)
    assert float(st.feature_distance(student, imagenet, small, things)) == pytest.approx(2.5)
    none = jnp.full((1, 2, 2), IGNORE_LABEL)
    value, grad = jax.value_and_grad(
        lambda s: st.feature_distance(s, imagenet, none, things))(student)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()
    # Equal features (F as it starts): distance 0, gradient 0, not NaN.
    grad = jax.grad(lambda s: st.feature_distance(s, s * 1.0, small, things))(imagenet)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def fd_config(**init):
    config = dacs_config("dacs", feature_distance_weight=0.005)
    config.model.backbone = "deeplabv2_resnet101"
    config.model.resnet_blocks = (1, 1, 1, 1)
    config.init.update(init)
    return config


@pytest.mark.parametrize("backbone, init, message", [
    ("deeplabv2_resnet101", {}, r"compares F with its ImageNet weights, and none are given"),
    ("deeplabv2_resnet101", {"resnet_weights": "r.h5", "f_workdir": "runs/pre"},
     r"config.init.f_workdir starts F from another run"),
    ("deeplabv2_resnet101", {"resnet_weights": "r.h5", "f_file": "f.npz"},
     r"config.init.f_file starts F from another run"),
    ("fcn8s_vgg16", {"vgg16_weights": "v.h5"}, r"needs a DeepLab-v2 backbone"),
])
def test_the_feature_distance_is_refused_without_imagenet_weights(backbone, init, message):
    config = fd_config(**init)
    config.model.backbone = backbone
    with pytest.raises(ValueError, match=message) as error:
        methods.build(config)
    assert "\n" not in str(error.value)


def test_the_feature_distance_classes_by_name_in_each_class_set():
    config = fd_config(resnet_weights="r.h5")
    assert st.thing_class_indices(config) == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    config.data.class_set, config.num_classes = "synthia16", 16
    from lsd_jax.data import classes
    names = [classes.class_names("synthia16")[i] for i in st.thing_class_indices(config)]
    assert names == ["traffic light", "traffic sign", "person", "rider", "car", "bus",
                     "motorcycle", "bicycle"]   # no truck or train in SYNTHIA's 16
    config.dacs.feature_distance_classes = ("car", "lorry")
    with pytest.raises(ValueError, match=r"\['lorry'\] are not class names"):
        st.thing_class_indices(config)


@pytest.mark.slow  # compiles a DeepLab student's loss
def test_the_feature_distance_term_against_a_frozen_imagenet_copy():
    """About 20 s. The copy is F as config.init made it (states["imagenet"]), run in
    evaluation mode; with BatchNorm on its running statistics in training too ("frozen"), the
    term is 0 at the start (in the references' mode, batch statistics, it is not, as in
    DAFormer); once F moves it is positive, and its gradient reaches F."""
    config = fd_config(resnet_weights="r.h5")
    config.model.bn_statistics = "frozen"
    method = methods.build(config)
    assert method.copies_of_f == ("imagenet",) and "f/fd" in method.console_terms
    states = method.init(jax.random.key(0))
    f = method.networks["f"]
    b = batch()
    b["source_label"] = jnp.full_like(b["source_label"], 13)   # all car: every cell counts

    @jax.jit
    def terms(student_params, imagenet):
        _, (t, _) = st.student_loss(f, config.dacs, config.num_classes,
                                    states["f"].variables(student_params), states["teacher"], b,
                                    jax.random.key(2), imagenet, st.thing_class_indices(config))
        return t["fd"]
    assert float(terms(states["f"].params, states["imagenet"])) == pytest.approx(0.0, abs=1e-6)
    moved = jax.tree.map(lambda p: p * 1.1, states["f"].params)
    assert float(terms(moved, states["imagenet"])) > 0.0
    grads = jax.grad(lambda p, i: terms(p, i), argnums=(0,))(moved, states["imagenet"])
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_the_published_daformer_and_mic_settings():
    """configs/gta_deeplab.py:daformer and :mic (and SYNTHIA's) against DAFormer's numbers."""
    from lsd_jax.methods import source_only
    from train_helpers import load_config_file

    for name in ("gta_deeplab", "synthia_deeplab"):
        for variant in ("daformer", "mic"):
            config = load_config_file(name, variant)
            assert config.method == "dacs" and config.model.aspp_branches == 4
            assert config.train.num_steps == 40_000 and config.data.batch_size == 2
            assert tuple(config.data.source.crop) == (512, 512)
            block = config.dacs
            assert block.optimizer == "daformer_adamw" and block.warmup_steps == 1500
            assert block.ema_alpha == 0.999 and block.feature_distance_weight == 0.005
            assert tuple(block.pseudo_label_crop) == (15, 120)
            assert (block.jitter_strength, block.jitter_probability) == (0.2, 0.2)
            assert block.mic_weight == (1.0 if variant == "mic" else 0.0)
            assert (block.mic_block_size, block.mic_mask_ratio) == (32, 0.7)
            assert config.data.rcs.enabled and config.data.rcs.temperature == 0.01
            optim = config.daformer_optim
            assert (optim.lr, optim.classifier_lr_mult, optim.weight_decay, optim.poly_power,
                    optim.poly_steps) == (6e-5, 10.0, 0.01, 1.0, 40_000)
            _, rates = source_only.optimizer_and_rates(config, "dacs")
            assert rates(0)["lr/f"] == pytest.approx(6e-5 * 1e-6)
            assert rates(750)["lr/f"] == pytest.approx(6e-5 * (1 - 750 / 40_000) * (0.5 + 0.5e-6))
            assert rates(20_000) == {"lr/f": pytest.approx(3e-5),
                                     "lr/f_classifier": pytest.approx(3e-4)}


def test_daformer_adamw_decays_all_but_batchnorm_and_runs_the_head_at_10x():
    from lsd_jax.methods import source_only

    block = default.get_config().daformer_optim
    tx, _ = source_only.daformer_adamw(block)
    params = {"conv1": {"kernel": jnp.ones(2)}, "bn1": {"scale": jnp.ones(2)},
              "classifier_0": {"kernel": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)   # no gradient: decay alone
    lr = block.lr
    np.testing.assert_allclose(updates["conv1"]["kernel"], -lr * 0.01, rtol=1e-5)
    np.testing.assert_allclose(updates["bn1"]["scale"], 0.0)
    np.testing.assert_allclose(updates["classifier_0"]["kernel"], -10 * lr * 0.01, rtol=1e-5)
