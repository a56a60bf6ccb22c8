"""FCAN's appearance adaptation (AAN): the objective against a float64 transcription of
docs/methods.md section 11, the normalised steps, the resumable command, the adapted dataset."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsd_jax import appearance_transfer as aan
from lsd_jax.config_files import load_sibling
from lsd_jax.data import pipeline
from lsd_jax.data.datasets import common
from lsd_jax.models.resnet import ImageNetResNet

TINY = {"height": 32, "width": 64, "num_train": 5, "num_validation": 2}
OBJECTIVE = aan.Objective(layers=("conv1", "res2"), content_weights=(1.0, 0.5),
                          style_weights=(2.0, 1.0), alpha=1e-3, iterations=3, step_size=10.0)


def toy_features(variables, x):
    """A two-layer stand-in for the ResNet, small enough to transcribe in numpy."""
    h = jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, variables["w1"]))
    pooled = h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, -1).mean((2, 4))
    return {"conv1": h, "res2": jnp.einsum("bhwc,cd->bhwd", pooled, variables["w2"])}


def numpy_loss(features, content, grams, objective):
    """L of one image in float64, with the paper's unnormalised Gram sums ||F^T F - N G_t||^2."""
    total_content = total_style = 0.0
    for name, w_s, w_t in zip(objective.layers, objective.content_weights,
                              objective.style_weights):
        f = np.asarray(features[name], np.float64).reshape(-1, features[name].shape[-1])
        total_content += w_s * np.sum((f - np.asarray(content[name], np.float64).reshape(
            f.shape)) ** 2)
        total_style += w_t * np.sum((f.T @ f - len(f) * np.asarray(grams[name], np.float64)) ** 2)
    return total_content, objective.alpha * total_style


@pytest.fixture(scope="module")
def toy():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    variables = {"w1": jax.random.normal(k1, (3, 4)) * 0.02,
                 "w2": jax.random.normal(k2, (4, 5))}
    content = jax.random.uniform(k3, (2, 8, 8, 3), minval=-100, maxval=100)
    target = jax.random.uniform(k4, (3, 8, 8, 3), minval=-120, maxval=120)
    grams = {k: v / 3 for k, v in aan.gram_sums(toy_features, variables, target,
                                                OBJECTIVE.layers).items()}
    return variables, content, grams


def test_gram_is_the_mean_over_positions():
    f = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = np.stack([x.reshape(12, 5).T @ x.reshape(12, 5) / 12 for x in f])
    np.testing.assert_allclose(aan.gram(jnp.asarray(f)), expected, rtol=1e-5)


def test_losses_match_a_float64_transcription(toy):
    variables, content_images, grams = toy
    start = jax.random.uniform(jax.random.key(5), content_images.shape, minval=-128, maxval=128)
    content = toy_features(variables, content_images)
    content_term, style_term = aan.losses(toy_features(variables, start), content, grams,
                                          OBJECTIVE)
    features = toy_features(variables, start)
    for i in range(2):
        expected = numpy_loss({k: v[i] for k, v in features.items()},
                              {k: v[i] for k, v in content.items()}, grams, OBJECTIVE)
        np.testing.assert_allclose([content_term[i], style_term[i]], expected, rtol=1e-4)


def test_each_image_takes_its_own_normalised_steps(toy):
    """x <- x - w_i g / mean|g| with w_i = step (I - i) / I, per image: the batch of two gives
    what each image gives alone, and each step is the transcribed one."""
    variables, content, grams = toy
    start = jax.random.uniform(jax.random.key(6), content.shape, minval=-128, maxval=128)
    adapted, before, after = aan.adapt_images(toy_features, variables, content, start, grams,
                                              OBJECTIVE)
    for i in range(2):
        alone = aan.adapt_images(toy_features, variables, content[i:i + 1], start[i:i + 1],
                                 grams, OBJECTIVE)[0]
        np.testing.assert_allclose(alone[0], adapted[i], rtol=1e-5, atol=1e-3)

    target_features = {k: v[:1] for k, v in toy_features(variables, content).items()}

    def loss(x):
        c, s = aan.losses(toy_features(variables, x), target_features, grams, OBJECTIVE)
        return jnp.sum(c + s)

    x = start[:1]
    for i in range(OBJECTIVE.iterations):
        g = np.asarray(jax.grad(loss)(x), np.float64)
        rate = OBJECTIVE.step_size * (OBJECTIVE.iterations - i) / OBJECTIVE.iterations
        x = x - rate * g / np.mean(np.abs(g))
    np.testing.assert_allclose(adapted[0], x[0], rtol=1e-4, atol=1e-2)
    # Compiled as the command runs it: the same images.
    compiled = jax.jit(aan.adapt_images, static_argnums=(0, 5))(
        toy_features, variables, content, start, grams, OBJECTIVE)[0]
    np.testing.assert_allclose(compiled, adapted, rtol=1e-4, atol=1e-2)


@pytest.mark.slow  # compiles whole networks' gradients
def test_the_objective_falls_on_the_resnet():
    model = ImageNetResNet(width=1 / 16, blocks=(1, 1, 1, 1))
    variables = aan.random_features(model, seed=0)
    rng = np.random.default_rng(0)
    content = aan.caffe_from_rgb(jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3))))
    target = aan.caffe_from_rgb(jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3))))
    layers = ("conv1", "res2", "res3", "res4", "res5")
    grams = {k: v / 2 for k, v in aan.gram_sums(model.apply, variables, target, layers).items()}
    objective = aan.Objective(layers, (1.0,) * 5, (1.0,) * 5, 1e-6, 40, 10.0)
    start = jnp.stack([aan.white_noise(0, n, (32, 32)) for n in ("a", "b")])
    _, (c0, s0), (c1, s1) = jax.jit(aan.adapt_images, static_argnums=(0, 5))(
        model.apply, variables, content, start, grams, objective)
    assert np.all(c1 + s1 < 0.7 * (c0 + s0)), (c0 + s0, c1 + s1)


def test_settings_are_checked():
    config = load_sibling("configs/default.py").get_config()
    assert aan.objective_from_config(config.aan).alpha == 1e-14
    for field, value, message in (("layers", ("conv1", "pool5"), "config.aan.layers"),
                                  ("content_weights", (1.0,), "config.aan.content_weights"),
                                  ("alpha", 0.0, "config.aan.alpha"),
                                  ("iterations", 0, "config.aan.iterations"),
                                  ("start", "mean", "config.aan.start")):
        bad = load_sibling("configs/default.py").get_config()
        bad.aan[field] = value
        with pytest.raises(aan.AppearanceTransferError, match=message):
            aan.objective_from_config(bad.aan)


def test_the_fcan_variant_trains_on_the_adapted_copy():
    config = load_sibling("configs/synthia.py", "synthia.py").get_config("fcan")
    assert config.data.source.name == "appearance_adapted/synthia16"
    assert (config.method, config.adversarial.discriminator) == ("adversarial", "aspp")
    assert config.adversarial.seg_weight == 5.0


def tiny_config(data_dir):
    config = load_sibling("configs/synthetic.py", "synthetic.py").get_config("lsd")
    config.data.data_dir = str(data_dir)
    for domain in (config.data.source, config.data.target):
        domain.config_overrides = dict(TINY)
    config.data.target.split = "train[:3]"
    config.aan.update(width=1 / 16, resnet_blocks=(1, 1, 1, 1), iterations=4, batch_size=2,
                      alpha=1e-6)
    return config


class Silent:
    def __init__(self, *args, **kwargs):
        pass

    update = close = __init__


def source_labels(config):
    builder = pipeline.load_builder(config.data.source.name, config.data.data_dir,
                                    config_overrides=config.data.source.config_overrides.to_dict())
    return {ex["name"].decode(): ex["label"] for ex in
            builder.as_dataset(split="train").as_numpy_iterator()}


def read_png_dir(directory):
    return {name[:-4]: np.asarray(common.open_image(os.path.join(directory, name), name))
            for name in sorted(os.listdir(directory))}


@pytest.mark.slow  # compiles whole networks' gradients
def test_copy_resumes_refuses_other_settings_and_builds(tmp_path):
    config = tiny_config(tmp_path / "tfds")
    out, fresh = str(tmp_path / "copy"), str(tmp_path / "fresh")
    record = aan.write_adapted_copy(config, out, max_images=2, progress=Silent)
    assert (record["complete"], record["num_images"]) == (False, 2)
    first = read_png_dir(os.path.join(out, "images"))

    # An incomplete copy is not a dataset yet.
    with pytest.raises(common.LayoutError, match="not complete"):
        pipeline.load_builder("appearance_adapted/cityscapes19", config.data.data_dir, out)

    # Resumed: the two finished images are not redone; the rest is what a fresh run writes,
    # whatever the batching.
    record = aan.write_adapted_copy(config, out, progress=Silent)
    assert (record["complete"], record["num_images"]) == (True, TINY["num_train"])
    resumed = read_png_dir(os.path.join(out, "images"))
    assert all(np.array_equal(first[name], resumed[name]) for name in first)
    config.aan.batch_size = 1
    aan.write_adapted_copy(config, fresh, progress=Silent)
    for name, image in read_png_dir(os.path.join(fresh, "images")).items():
        assert np.abs(image.astype(int) - resumed[name]).max() <= 1, name
    losses = [json.loads(line) for line in open(os.path.join(out, aan.LOSSES))]
    assert sorted(line["name"] for line in losses) == sorted(resumed)

    other = tiny_config(tmp_path / "tfds")
    other.aan.alpha = 1e-3
    with pytest.raises(aan.AppearanceTransferError, match="objective"):
        aan.write_adapted_copy(other, out, progress=Silent)

    # The dataset: adapted images with the source's own labels, byte for byte.
    builder = pipeline.load_builder("appearance_adapted/cityscapes19", config.data.data_dir,
                                    out, {"copy": ""})
    examples = list(builder.as_dataset(split="train").as_numpy_iterator())
    labels = source_labels(config)
    assert sorted(ex["name"].decode() for ex in examples) == sorted(labels)
    for ex in examples:
        name = ex["name"].decode()
        np.testing.assert_array_equal(ex["label"], labels[name])
        np.testing.assert_array_equal(ex["image"], resumed[name])
    with pytest.raises(common.LayoutError, match="synthia16"):
        pipeline.load_builder("appearance_adapted/synthia16", config.data.data_dir, out)
    # Another copy (other settings: another fingerprint) under the name already built is
    # refused, not silently replaced by the built one.
    another = tmp_path / "another"
    another.mkdir()
    record = json.load(open(os.path.join(out, aan.RECORD)))
    (another / aan.RECORD).write_text(json.dumps({**record, "fingerprint": "0123456789ab"}))
    with pytest.raises(common.LayoutError, match="another adapted copy"):
        pipeline.load_builder("appearance_adapted/cityscapes19", config.data.data_dir,
                              str(another), {"copy": ""})

    # Training reads it through the :fcan variant's data settings.
    train = load_sibling("configs/synthetic.py", "synthetic.py").get_config("fcan")
    train.data.data_dir = config.data.data_dir
    train.data.source.manual_dir = out
    train.data.target.config_overrides = dict(TINY)
    train.data.target.split = "train"
    train.data.source.crop = train.data.target.crop = (32, 64)
    batch = next(pipeline.make_train_dataset(train.data).as_numpy_iterator())
    assert batch["source_label"].shape[1:] == (32, 64)


@pytest.mark.slow  # a subprocess
def test_command_refuses_an_adapted_source_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lsd_jax.appearance_transfer", "--config",
         "configs/synthetic.py:fcan", "--output", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("lsd_jax.appearance_transfer: config.data.source.name="), lines
    assert "Traceback" not in done.stderr
