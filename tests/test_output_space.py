"""AdaptSegNet's and ADVENT's discriminator and losses against PyTorch transcriptions of their
reference code (docs/methods.md, section 8), and their compiled gradients against float64."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lsd_jax import output_space
from lsd_jax.models.fc_discriminator import FCDiscriminator
from test_gradients import assert_close, to_float64

CLASSES = 19


def torch_fc_discriminator(num_classes: int, ndf: int = 64) -> torch.nn.Sequential:
    """AdaptSegNet's FCDiscriminator, written out from docs/methods.md, section 8."""
    conv = lambda i, o: torch.nn.Conv2d(i, o, kernel_size=4, stride=2, padding=1)  # noqa: E731
    act = lambda: torch.nn.LeakyReLU(negative_slope=0.2)  # noqa: E731
    return torch.nn.Sequential(conv(num_classes, ndf), act(), conv(ndf, ndf * 2), act(),
                               conv(ndf * 2, ndf * 4), act(), conv(ndf * 4, ndf * 8), act(),
                               conv(ndf * 8, 1))


def load_into_torch(params, model: torch.nn.Sequential) -> None:
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    names = ["conv1", "conv2", "conv3", "conv4", "classifier"]
    with torch.no_grad():
        for name, conv in zip(names, convs):
            kernel = np.asarray(params[name]["kernel"])  # (kh, kw, in, out)
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))


def test_fc_discriminator_matches_the_reference_transcription():
    maps = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 64, 96, CLASSES)) * 3)
    module = FCDiscriminator()
    variables = module.init(jax.random.key(1), maps)
    reference = torch_fc_discriminator(CLASSES)
    load_into_torch(variables["params"], reference)
    expected = reference(torch.from_numpy(np.array(maps).transpose(0, 3, 1, 2)))
    expected = expected.detach().numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(module.apply)(variables, maps))
    assert got.shape == expected.shape == (2, 2, 3, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fc_discriminator_size_and_parameters():
    module = FCDiscriminator()
    maps = jnp.zeros((1, 512, 1024, CLASSES))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), maps))
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(variables))
    assert count == sum(p.numel() for p in torch_fc_discriminator(CLASSES).parameters())
    assert count == 2_781_121
    assert jax.eval_shape(module.apply, variables, maps).shape == (1, 16, 32, 1)
    # An odd size: each conv takes n to floor(n / 2), as PyTorch's k4 s2 p1.
    odd = jnp.zeros((1, 321, 321, CLASSES))
    assert jax.eval_shape(module.apply, variables, odd).shape == (1, 10, 10, 1)
    small = FCDiscriminator(width=1 / 16).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert [small["params"][name]["kernel"].shape for name in
            ("conv1", "conv2", "conv3", "conv4", "classifier")] == [
        (4, 4, 3, 4), (4, 4, 4, 8), (4, 4, 8, 16), (4, 4, 16, 32), (4, 4, 32, 1)]


def test_fc_discriminator_starts_as_pytorch_does():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases, PyTorch's Conv2d default."""
    params = FCDiscriminator().init(jax.random.key(2), jnp.zeros((1, 32, 32, CLASSES)))["params"]
    for name, fan_in in (("conv1", 16 * CLASSES), ("conv3", 16 * 128), ("classifier", 16 * 512)):
        bound = 1 / np.sqrt(fan_in)
        for kind in ("kernel", "bias"):
            values = np.abs(np.asarray(params[name][kind]))
            assert values.max() <= bound, (name, kind)
        kernel = np.asarray(params[name]["kernel"])
        assert kernel.max() > 0.95 * bound and kernel.min() < -0.95 * bound, name
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound, name


@pytest.mark.parametrize("domain", [output_space.SOURCE, output_space.TARGET])
def test_gan_losses_match_pytorch(domain):
    logits = np.concatenate([np.random.default_rng(0).normal(0, 3, (2, 4, 5, 1)),
                             np.full((1, 4, 5, 1), 60.0), np.full((1, 4, 5, 1), -60.0)])
    logits = logits.astype(np.float32)
    t = torch.from_numpy(logits)
    labels = torch.full_like(t, float(domain))
    bce = torch.nn.BCEWithLogitsLoss()(t, labels).item()
    mse = torch.nn.MSELoss()(t, labels).item()
    np.testing.assert_allclose(float(output_space.gan_loss(jnp.asarray(logits), domain)), bce,
                               rtol=1e-5)
    np.testing.assert_allclose(float(output_space.gan_loss(jnp.asarray(logits), domain, "ls")),
                               mse, rtol=1e-5)


def torch_self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's prob_2_entropy, NCHW, written out from docs/methods.md, section 8."""
    _, c, _, _ = probs.size()
    return -torch.mul(probs, torch.log2(probs + 1e-30)) / np.log2(c)


def torch_entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    n, c, h, w = probs.size()
    return -torch.sum(torch.mul(probs, torch.log2(probs + 1e-30))) / (n * h * w * np.log2(c))


def test_self_information_and_entropy_match_pytorch():
    logits = np.random.default_rng(1).normal(0, 4, (2, 6, 7, CLASSES)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits.transpose(0, 3, 1, 2)), dim=1)
    info = np.asarray(output_space.self_information(jnp.asarray(logits)))
    np.testing.assert_allclose(info, torch_self_information(probs).numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(output_space.entropy_loss(jnp.asarray(logits))),
                               torch_entropy_loss(probs).item(), rtol=1e-5)
    # Normalised: 1 for a uniform prediction, 0 for a certain one.
    assert float(output_space.entropy_loss(jnp.zeros((1, 2, 2, CLASSES)))) == pytest.approx(1.0)
    certain = jnp.zeros((1, 2, 2, CLASSES)).at[..., 3].set(200.0)
    assert float(output_space.entropy_loss(certain)) == pytest.approx(0.0, abs=1e-6)


def advent_d_loss(module, logits_s, logits_t):
    """AdvEnt's D loss (BCE) plus an LS-GAN term, on self-information maps, as a function of
    D's parameters."""
    def loss(params):
        d_s = module.apply({"params": params}, output_space.self_information(logits_s))
        d_t = module.apply({"params": params}, output_space.self_information(logits_t))
        return (0.5 * output_space.gan_loss(d_s, output_space.SOURCE)
                + 0.5 * output_space.gan_loss(d_t, output_space.TARGET)
                + output_space.gan_loss(d_t, output_space.SOURCE, "ls"))
    return loss


@pytest.mark.slow  # compiles whole networks' gradients
def test_compiled_discriminator_gradients_match_eager_and_float64():
    # Measured float32 noise here: at most 4e-6 of a tensor's largest element; the tolerance is
    # the one of tests/test_gradients.py (1e-3).
    module = FCDiscriminator(width=1 / 8)
    logits_s = jax.random.normal(jax.random.key(3), (1, 64, 64, CLASSES)) * 3
    logits_t = jax.random.normal(jax.random.key(4), (1, 64, 64, CLASSES)) * 3
    params = module.init(jax.random.key(5), logits_s)["params"]
    grad = jax.grad(advent_d_loss(module, logits_s, logits_t))
    compiled = jax.jit(grad)(params)
    with jax.disable_jit():
        assert_close(compiled, grad(params), "FCDiscriminator: jit(grad) against eager grad")
    with jax.enable_x64(True):  # the same values, cast (drawn in float64 they would differ)
        params64, logits_s, logits_t = to_float64((params, logits_s, logits_t))
        grad64 = jax.grad(advent_d_loss(module, logits_s, logits_t))
        reference = jax.tree.map(np.asarray, jax.jit(grad64)(params64))
    assert_close(compiled, reference, "FCDiscriminator: float32 against float64")


@pytest.mark.parametrize("call, message", [
    (lambda: output_space.gan_loss(jnp.zeros((1, 2, 2, 1)), 0, "wgan"),
     "gan_loss: kind must be one of ('bce', 'ls'), got 'wgan'"),
    (lambda: output_space.gan_loss(jnp.zeros((1, 2, 2, 1)), 2),
     "gan_loss: domain must be 0 (source) or 1 (target), got 2"),
    (lambda: FCDiscriminator().init(jax.random.key(0), jnp.zeros((32, 32, 19))),
     "FCDiscriminator: expected class maps (N, H, W, C), got shape (32, 32, 19)"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
