"""ADDA's procedure on digits, with lsd_jax's adversarial losses and discriminator.

    pip install scikit-learn   # its bundled 8x8 digits (no download)
    python benchmarks/adda_digits.py --seeds 5 [--shift faded] [--d-gate 0.6]

A check of the ADDA pieces in `lsd_jax/methods/adversarial.py` (the GAN mapping loss, D's loss,
untied encoders with the classifier fixed) on the kind of problem ADDA's paper measured, where a
digits dataset can be had without a download: scikit-learn's 1,797 8x8 digits as the source, a
transformed copy of other images as the target ("faded": 0.5 x + 0.25; "shifted": moved one
pixel right and down; both with Gaussian noise of std 0.1; "inverted": 1 - x, under which a
source model ranks the classes nearly backwards). The paper's datasets (MNIST, USPS, SVHN) are not here, so its numbers
(MNIST->USPS 0.894 from 0.752 source-only) are a reference for the size of the effect, not a
target. Images are split into three disjoint sets: 900 labelled source images, 600 unlabelled
target images to adapt on, 297 target images to test on (the same split for every seed).

Stages, as the paper's: (a) the source encoder M_s (a small CNN) and the classifier C on the
labelled source, Adam 1e-3, 3,000 steps of 128; (b) the target encoder M_t from M_s, C and M_s
fixed, against D = 500-500-2 on the 128-d features (`PixelDiscriminator` on 1x1 maps), both
with Adam 2e-4 (beta1 0.5), batch 128 per domain, `--steps` iterations (the paper's 10,000);
(c) target test accuracy of C(M_t(x)), beside source-only C(M_s(x)) and an oracle trained on the
600 target images' labels. Prints each seed and the mean +- sample std.
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsd_jax.methods import adversarial
from lsd_jax.models.domain_discriminators import PixelDiscriminator

SPLIT = (900, 600, 297)  # labelled source, unlabelled target, target test
SHIFTS = ("faded", "shifted", "inverted")


class Encoder(nn.Module):
    """8x8 digit -> 128 features."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        return nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))


def digits(shift: str, seed: int = 0):
    """(source x, y), (target x, y), (test x, y): disjoint images, the target ones shifted."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("benchmarks/adda_digits.py needs scikit-learn (its bundled digits): "
                 "pip install scikit-learn")
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    a, b = SPLIT[0], SPLIT[0] + SPLIT[1]
    parts = [order[:a], order[a:b], order[b:b + SPLIT[2]]]
    rng = np.random.default_rng(seed + 1)

    def shifted(images):
        if shift == "inverted":
            return 1.0 - images
        if shift == "faded":
            images = 0.5 * images + 0.25
        else:  # "shifted": one pixel right and down, zeros coming in
            images = np.pad(images, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :8, :8]
        noisy = images + 0.1 * rng.standard_normal(images.shape)
        return np.clip(noisy, 0, 1).astype(np.float32)

    return ((x[parts[0]], y[parts[0]]), (shifted(x[parts[1]]), y[parts[1]]),
            (shifted(x[parts[2]]), y[parts[2]]))


def batches(rng, n, size):
    while True:
        yield rng.choice(n, size, replace=False)


def train_classifier(key, x, y, steps: int, encoder: Encoder, classifier: nn.Dense):
    """Encoder and classifier on labelled images (stage a, and the oracle)."""
    k1, k2 = jax.random.split(key)
    params = {"m": encoder.init(k1, x[:1]), "c": classifier.init(k2, jnp.zeros((1, 128)))}
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss(p):
            logits = classifier.apply(p["c"], encoder.apply(p["m"], xb))
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    for _, idx in zip(range(steps), batches(rng, len(x), 128)):
        params, opt = step(params, opt, x[idx], y[idx])
    return params


def adapt(key, m_source, source_x, target_x, steps: int, encoder, d_gate: float):
    """ADDA stage (b): M_t from M_s against D; returns M_t's parameters."""
    d = PixelDiscriminator((500, 500), dropout_rate=0.0)
    d_params = d.init(key, jnp.zeros((1, 1, 1, 128)))
    m_tx, d_tx = optax.adam(2e-4, b1=0.5), optax.adam(2e-4, b1=0.5)
    m_target = m_source
    m_opt, d_opt = m_tx.init(m_target), d_tx.init(d_params)

    def features(m, x):
        return encoder.apply(m, x)[:, None, None, :]  # D's per-location input: 1x1 maps

    @jax.jit
    def step(m_target, d_params, m_opt, d_opt, xs, xt):
        fs = jax.lax.stop_gradient(features(m_source, xs))

        def d_loss(p):
            ft = jax.lax.stop_gradient(features(m_target, xt))
            return sum(adversarial.d_loss_terms(d.apply(p, fs), d.apply(p, ft)).values())

        def m_loss(m):
            out_s, out_t = d.apply(d_params, fs), d.apply(d_params, features(m, xt))
            gate = jax.lax.stop_gradient(adversarial.d_accuracy(out_s, out_t) > d_gate)
            return gate * adversarial.mapping_loss("gan", out_s, out_t)

        # Simultaneous: both gradients from the same pre-step parameters, as ADDA's code runs
        # its two optimisers in one session call.
        d_grads, m_grads = jax.grad(d_loss)(d_params), jax.grad(m_loss)(m_target)
        updates, d_opt = d_tx.update(d_grads, d_opt)
        d_params = optax.apply_updates(d_params, updates)
        updates, m_opt = m_tx.update(m_grads, m_opt)
        return optax.apply_updates(m_target, updates), d_params, m_opt, d_opt

    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    for _, i, j in zip(range(steps), batches(rng, len(source_x), 128),
                       batches(rng, len(target_x), 128)):
        m_target, d_params, m_opt, d_opt = step(m_target, d_params, m_opt, d_opt,
                                                source_x[i], target_x[j])
    return m_target


def accuracy(encoder, classifier, m, c, x, y) -> float:
    return float(np.mean(np.argmax(classifier.apply(c, encoder.apply(m, x)), -1) == y))


def run_seed(seed: int, shift: str, steps: int, d_gate: float) -> dict[str, float]:
    (sx, sy), (tx, ty), (test_x, test_y) = digits(shift)
    encoder, classifier = Encoder(), nn.Dense(10)
    key = jax.random.key(seed)
    k_source, k_oracle, k_adapt = jax.random.split(key, 3)
    source = train_classifier(k_source, sx, sy, 3000, encoder, classifier)
    oracle = train_classifier(k_oracle, tx, ty, 3000, encoder, classifier)
    m_target = adapt(k_adapt, source["m"], sx, tx, steps, encoder, d_gate)
    return {"source_only": accuracy(encoder, classifier, source["m"], source["c"], test_x, test_y),
            "adda": accuracy(encoder, classifier, m_target, source["c"], test_x, test_y),
            "oracle": accuracy(encoder, classifier, oracle["m"], oracle["c"], test_x, test_y)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shift", choices=SHIFTS, default="faded")
    parser.add_argument("--steps", type=int, default=10_000, help="ADDA stage (b) iterations")
    parser.add_argument("--d-gate", type=float, default=0.0,
                        help="update M_t only while D's accuracy is above this (0 = never gate)")
    args = parser.parse_args(argv)
    results = []
    for seed in range(args.seeds):
        start = time.time()
        result = run_seed(seed, args.shift, args.steps, args.d_gate)
        results.append(result)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
              + f" ({time.time() - start:.0f} s)", flush=True)
    for name in ("source_only", "adda", "oracle"):
        values = np.array([r[name] for r in results])
        spread = values.std(ddof=1) if len(values) > 1 else float("nan")
        print(f"{name}: {values.mean():.3f} +- {spread:.3f} (target test accuracy, "
              f"{args.seeds} seeds, shift {args.shift}, {args.steps} ADDA steps, d_gate "
              f"{args.d_gate})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
