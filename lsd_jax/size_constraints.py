"""Category-specific size constraints of "FCNs in the Wild" (Hoffman et al., 2016).

The target domain has no labels, but the source labels say how large each class tends to be.
FCNs in the Wild turns that into a constraint on every target image:

1. Source statistics (`class_size_statistics`): for each class c, over the source images that
   contain c, the fraction of the image's pixels labelled c; alpha_c is its 10th percentile,
   delta_c its mean, gamma_c its 90th percentile.
2. Presence (`present_classes`): on a target image, c is present if the fraction of pixels
   predicted as c (argmax), d_c, exceeds 0.1 * alpha_c.
3. For present classes, the predicted mass sum_hw p_hw(c) / HW must lie in [delta_c, gamma_c]:
   with slack on the lower bound, none on the upper.
4. Constrained multiple-instance loss, as CCNN (Pathak et al., 2015): the latent distribution P
   closest to the softmax Q (in KL) that satisfies the constraints (`latent_distribution`,
   solved per image through its dual), and the segmentation network trained with cross-entropy
   to P: gradient Q - P with respect to the logits, down-weighted by 0.1 for the large classes
   (alpha_c > 0.1) (`size_constraint_loss`).

The statistics are computed once per source dataset and class set and stored as JSON
(`save_statistics`, `load_statistics`) by the command

    python -m lsd_jax.size_constraints --config configs/synthetic.py --output PATH [--max_images N]

which reads config.data.source's labels as training does (same dataset, split and class set)
but at the stored resolution, without crops or flips.

This module imports neither TensorFlow nor flax at module level, so that models and training
steps can use it without them; only the command imports TensorFlow.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255

# The reference's rule for which classes count as present, and for the large classes whose
# gradients are down-weighted.
PRESENCE_FACTOR = 0.1
LARGE_CLASS_FRACTION = 0.1
LARGE_CLASS_WEIGHT = 0.1

# The solver's defaults (see `latent_distribution`). Measured against a float64 solution of 5,000
# steps, on 64x128 images of 19 classes with logits from smooth random maps of standard deviation
# 1 to 16 (9 to 19 present classes per image): the largest error of P after 50 steps is 4e-7
# (std 1), 1e-4 (std 8), 3e-3 (std 16); after 100 steps 1e-6 (std up to 8), 2e-5 (std 16). On 2
# CPU cores the loss and its gradient take 0.7 s for 2 images of 128x256.
DEFAULT_ITERATIONS = 100
DEFAULT_STEP_SIZE = 1.0

FILE_FORMAT = "lsd_jax.size_statistics"
FILE_VERSION = 1
_PER_CLASS_FIELDS = ("alpha", "delta", "gamma", "count")


class SizeStatistics(NamedTuple):
    """Per-class size statistics of a labelled (source) dataset.

    Fractions are of all of an image's pixels (H * W), unlabelled ones included; each is taken
    over the images that contain the class (count of them). A class in no image has alpha =
    delta = gamma = 0 and count 0, and is never constrained.

    A NamedTuple, so that it is a jax pytree: it can be passed to jitted functions as an
    argument as well as captured as constants.
    """
    alpha: np.ndarray   # (C,) float64, 10th percentile of the fraction
    delta: np.ndarray   # (C,) float64, mean of the fraction
    gamma: np.ndarray   # (C,) float64, 90th percentile of the fraction
    count: np.ndarray   # (C,) int64, images containing the class
    num_images: int     # images the statistics were taken over

    @property
    def num_classes(self) -> int:
        return len(self.alpha)


# ----------------------------------------------------------------------------- statistics


def class_size_statistics(label_maps: Iterable[np.ndarray], num_classes: int,
                          ignore_label: int = IGNORE_LABEL) -> SizeStatistics:
    """Size statistics of the classes of `label_maps` (iterable of (H, W) integer class ids).

    The fraction of class c in an image is (pixels labelled c) / (H * W): the denominator is
    every pixel of the image, unlabelled (`ignore_label`) ones included, because the constraint
    it feeds bounds the predicted mass over every pixel of a target image, where nothing is
    unlabelled. Over the images containing c: alpha_c = 10th percentile (numpy's default linear
    interpolation), delta_c = mean, gamma_c = 90th percentile.

    Note that alpha_c <= gamma_c always, but the mean need not lie between the percentiles
    (19 images at 1% and one at 100%: gamma 1% < delta 5.95%); `latent_distribution` handles a
    lower bound above the upper one.

    Raises ValueError for a label map that is not 2-D integer, a label outside
    [0, num_classes) other than `ignore_label` (naming the value and the image's index), or
    no label maps at all.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    fractions: list[list[float]] = [[] for _ in range(num_classes)]
    num_images = 0
    for index, label in enumerate(label_maps):
        label = np.asarray(label)
        if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"label map {index}: expected a 2-D integer array (H, W), got "
                             f"shape {label.shape} of dtype {label.dtype}")
        valid = label != ignore_label
        bad = valid & ((label < 0) | (label >= num_classes))
        if bad.any():
            raise ValueError(f"label map {index}: label value {int(label[bad][0])} is outside "
                             f"[0, {num_classes}) and is not the ignore label {ignore_label}")
        counts = np.bincount(label[valid].ravel(), minlength=num_classes)
        for c in np.flatnonzero(counts):
            fractions[c].append(counts[c] / label.size)
        num_images += 1
    if num_images == 0:
        raise ValueError("label_maps: no label maps; size statistics need at least one image")
    alpha, delta, gamma = (np.zeros(num_classes) for _ in range(3))
    for c, values in enumerate(fractions):
        if values:
            alpha[c], gamma[c] = np.percentile(values, [10, 90])
            delta[c] = np.mean(values)
    count = np.array([len(v) for v in fractions], np.int64)
    return SizeStatistics(alpha, delta, gamma, count, num_images)


def save_statistics(path: str, stats: SizeStatistics, *, dataset: str, class_set: str) -> None:
    """Write `stats` as JSON, with the dataset and class set they came from.

    Written to a temporary file beside `path` and renamed over it, so a reader never sees a
    half-written file.
    """
    record = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "dataset": dataset,
        "class_set": class_set,
        "num_classes": stats.num_classes,
        "num_images": int(stats.num_images),
        "fraction_of": "all pixels of the image (H * W), unlabelled ones included",
        "alpha": [float(x) for x in stats.alpha],
        "delta": [float(x) for x in stats.delta],
        "gamma": [float(x) for x in stats.gamma],
        "count": [int(x) for x in stats.count],
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_statistics(path: str, num_classes: int, class_set: str | None = None
                    ) -> SizeStatistics:
    """Read statistics written by `save_statistics`, checking that they fit a model of
    `num_classes` classes (and the class set `class_set`, when given).

    Checks: the file exists and is JSON of this format and version; alpha, delta, gamma and
    count have num_classes entries; fractions are finite and in [0, 1], counts are integers in
    [0, num_images]; where count > 0, 0 < alpha <= gamma and delta > 0; where count == 0,
    alpha = delta = gamma = 0. (alpha <= delta <= gamma is not required: see
    `class_size_statistics`.) Each failure is a ValueError (FileNotFoundError for a missing
    file) naming the path and the field.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"size statistics {path}: no such file (write it with `python "
                                "-m lsd_jax.size_constraints --config ... --output PATH`)")
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"size statistics {path}: not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"size statistics {path}: expected a JSON object, got "
                         f"{type(record).__name__}")

    def field(name):
        if name not in record:
            raise ValueError(f"size statistics {path}: field {name!r} is missing")
        return record[name]

    if field("format") != FILE_FORMAT:
        raise ValueError(f"size statistics {path}: field 'format' is {record['format']!r}, "
                         f"expected {FILE_FORMAT!r}")
    if field("version") != FILE_VERSION:
        raise ValueError(f"size statistics {path}: field 'version' is {record['version']!r}; "
                         f"this code reads version {FILE_VERSION}")
    if class_set is not None and field("class_set") != class_set:
        raise ValueError(f"size statistics {path}: field 'class_set' is "
                         f"{record['class_set']!r}, expected {class_set!r}")
    num_images = field("num_images")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"size statistics {path}: field 'num_images' is {num_images!r}, "
                         "expected a positive integer")
    values = {}
    for name in _PER_CLASS_FIELDS:
        value = field(name)
        if not isinstance(value, list) or len(value) != num_classes:
            length = len(value) if isinstance(value, list) else type(value).__name__
            raise ValueError(f"size statistics {path}: field {name!r} has {length} entries, "
                             f"expected {num_classes} (one per class)")
        kinds = (int,) if name == "count" else (int, float)
        if not all(isinstance(x, kinds) and not isinstance(x, bool) for x in value):
            raise ValueError(f"size statistics {path}: field {name!r} must hold "
                             f"{'integers' if name == 'count' else 'numbers'}")
        values[name] = np.array(value, np.int64 if name == "count" else np.float64)
    for name in ("alpha", "delta", "gamma"):
        x = values[name]
        if not np.all(np.isfinite(x) & (x >= 0) & (x <= 1)):
            c = int(np.flatnonzero(~(np.isfinite(x) & (x >= 0) & (x <= 1)))[0])
            raise ValueError(f"size statistics {path}: field {name!r} of class {c} is {x[c]}, "
                             "expected a fraction in [0, 1]")
    alpha, delta, gamma, count = (values[n] for n in _PER_CLASS_FIELDS)
    bad = np.flatnonzero((count < 0) | (count > num_images))
    if bad.size:
        raise ValueError(f"size statistics {path}: field 'count' of class {bad[0]} is "
                         f"{count[bad[0]]}, expected 0 to num_images={num_images}")
    seen = count > 0
    checks = (
        ("alpha", seen & (alpha <= 0), "positive where count > 0 (a percentile of fractions "
                                       "of images that contain the class)"),
        ("delta", seen & (delta <= 0), "positive where count > 0"),
        ("alpha", seen & (alpha > gamma), "at most gamma (10th percentile <= 90th)"),
        ("alpha", ~seen & ((alpha != 0) | (delta != 0) | (gamma != 0)),
         "0, with delta and gamma, where count is 0"),
    )
    for name, failed, expected in checks:
        if failed.any():
            c = int(np.flatnonzero(failed)[0])
            raise ValueError(f"size statistics {path}: field {name!r} of class {c} is "
                             f"{values[name][c]} (alpha {alpha[c]}, delta {delta[c]}, gamma "
                             f"{gamma[c]}, count {count[c]}); expected {expected}")
    return SizeStatistics(alpha, delta, gamma, count, num_images)


# ----------------------------------------------------------------------------- constraints


def _at_least_float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _predicted_fractions(scores: jax.Array) -> jax.Array:
    """(N, ..., C) scores -> (N, C) fraction of each image's pixels whose argmax is c."""
    num_classes = scores.shape[-1]
    pred = jnp.argmax(scores, axis=-1).reshape(scores.shape[0], -1)
    one_hot = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
    return jnp.mean(one_hot, axis=1)


def present_classes(probs: jax.Array, stats: SizeStatistics) -> jax.Array:
    """(N, C) bool: which classes are present, and so constrained, in each image.

    probs: (N, H, W, C) class probabilities (or logits: only their argmax is used). Class c is
    present in an image if the fraction d_c of its pixels predicted as c (argmax) exceeds
    PRESENCE_FACTOR * alpha_c, and the source contains c (count_c > 0; without that rule a
    class never seen in the source, alpha_c = 0, would be present wherever it is predicted at
    all, and bounded to zero mass).
    """
    if probs.ndim != 4 or probs.shape[-1] != len(stats.alpha):
        raise ValueError(f"present_classes: expected probs (N, H, W, {len(stats.alpha)}), got "
                         f"shape {tuple(probs.shape)}")
    fractions = _predicted_fractions(probs)
    alpha = jnp.asarray(stats.alpha, jnp.float32)
    return (fractions > PRESENCE_FACTOR * alpha) & (jnp.asarray(stats.count) > 0)


def _solve_dual(log_q, lower, upper, active, slack_weight, iterations, step_size):
    """The solver of `latent_distribution` in log space: log_q (N, M, C) -> (log P, lambda)."""
    num_pixels = log_q.shape[1]
    tiny = jnp.finfo(log_q.dtype).tiny
    # A lower bound above the upper one only adds a constant to the objective (see
    # latent_distribution), so it is moved down to the upper bound.
    lower = jnp.minimum(lower, upper)
    log_lower = jnp.log(jnp.maximum(lower, tiny))
    log_upper = jnp.log(jnp.maximum(upper, tiny))
    log_n = math.log(num_pixels)

    def step(_, lam):
        log_p = jax.nn.log_softmax(log_q + lam[:, None, :], axis=-1)
        log_mass = jax.nn.logsumexp(log_p, axis=1) - log_n  # log of mean_hw P_hw(c)
        raise_ = jnp.clip(lam + step_size * (log_lower - log_mass), 0.0, slack_weight)
        lower_ = jnp.minimum(lam + step_size * (log_upper - log_mass), 0.0)
        return jnp.where(active, raise_ + lower_, 0.0)

    start = jnp.zeros((log_q.shape[0], log_q.shape[2]), log_q.dtype)
    lam = jax.lax.fori_loop(0, iterations, step, start)
    return jax.nn.log_softmax(log_q + lam[:, None, :], axis=-1), lam


def _bounds(x, shape, name):
    x = jnp.asarray(x)
    try:
        return jnp.broadcast_to(x, shape)
    except ValueError:
        raise ValueError(f"latent_distribution: {name} of shape {tuple(x.shape)} does not "
                         f"broadcast to (N, C) = {shape}") from None


def latent_log_distribution(log_probs: jax.Array, lower, upper, active, *,
                            slack_weight: float, iterations: int = DEFAULT_ITERATIONS,
                            step_size: float = DEFAULT_STEP_SIZE) -> jax.Array:
    """`latent_distribution` from log-probabilities (e.g. log_softmax of the logits, which
    keeps tiny probabilities that a softmax would round to 0); returns log P."""
    if log_probs.ndim < 3:
        raise ValueError(f"latent_distribution: expected probabilities (N, ..., C), got shape "
                         f"{tuple(log_probs.shape)}")
    if isinstance(slack_weight, (int, float)) and not slack_weight >= 0:
        raise ValueError(f"latent_distribution: slack_weight must be >= 0, got {slack_weight}")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError("latent_distribution: iterations must be a non-negative Python int, "
                         f"got {iterations!r}")
    shape = log_probs.shape
    n, c = shape[0], shape[-1]
    log_q = jax.lax.stop_gradient(_at_least_float32(log_probs)).reshape(n, -1, c)
    dtype = log_q.dtype
    lower = jax.lax.stop_gradient(_bounds(lower, (n, c), "lower").astype(dtype))
    upper = jax.lax.stop_gradient(_bounds(upper, (n, c), "upper").astype(dtype))
    active = _bounds(active, (n, c), "active").astype(bool)
    log_p, _ = _solve_dual(log_q, lower, upper, active, slack_weight, iterations, step_size)
    return jax.lax.stop_gradient(log_p.reshape(shape))


def latent_distribution(probs: jax.Array, lower, upper, active, *, slack_weight: float,
                        iterations: int = DEFAULT_ITERATIONS,
                        step_size: float = DEFAULT_STEP_SIZE) -> jax.Array:
    """The distribution P closest to Q = `probs` that meets the size constraints, per image.

    Args:
      probs: (N, ..., C) class probabilities Q (e.g. (N, H, W, C)); each image is one problem
        over its M pixels (the middle axes).
      lower, upper: (N, C) or (C,) bounds on the mean mass mean_hw P_hw(c) (delta, gamma).
      active: (N, C) or (C,) bool; inactive classes are unconstrained.
      slack_weight: price of one unit of lower-bound slack (see below); must be >= 0.
      iterations: fixed number of solver steps (a Python int, so that the loop has a fixed
        length under jit).
      step_size: multiplier of each step in log space; 1 is the step with the monotone
        guarantee below.

    Returns P, of the shape of probs, in float32 (or wider), with no gradient (it is a target).

    The problem, per image of M pixels (the KL is averaged over pixels, so that slack_weight
    means the same at every resolution; the form summed over pixels, as in CCNN, is the same
    problem with slack_weight * M):

        min_{P, xi}  1/M sum_hw KL(P_hw || Q_hw) + slack_weight * sum_c xi_c
        s.t.  P_hw on the simplex;  for active c:  mean_hw P_hw(c) >= lower_c - xi_c,
              xi_c >= 0,  mean_hw P_hw(c) <= upper_c.

    Dual: with multipliers mu_c >= 0 (lower) and nu_c >= 0 (upper), minimising over xi bounds
    mu_c <= slack_weight, and over P gives P_hw(c) = Q_hw(c) exp(lambda_c) / Z_hw with
    lambda = mu - nu (0 for inactive classes). For lower <= upper only one of mu_c, nu_c is
    non-zero at the optimum, and the dual is the concave

        g(lambda) = -1/M sum_hw log Z_hw(lambda) + sum_c min(lower_c lambda_c, upper_c lambda_c),
        lambda_c <= slack_weight.

    (If lower_c > upper_c, the slack is at least lower_c - upper_c whatever P, which only adds
    a constant to the objective: the problem is the same with lower_c = upper_c.)

    Solver: the generalised iterative scaling step. With m_c = mean_hw P_hw(c) at the current
    lambda, -log sum_c P_hw(c) e^{t_c} >= 1 - sum_c P_hw(c) e^{t_c} bounds the gain of a step t
    from below by a sum of concave one-dimensional functions, each maximised in closed form:

        lambda_c <- clip(lambda_c + log(lower_c / m_c), 0, slack_weight)
                    + min(lambda_c + log(upper_c / m_c), 0).

    Each step therefore increases the dual (with step_size 1, and also for smaller steps), its
    fixed points are exactly the KKT points (m_c = lower_c for 0 < lambda_c < slack_weight,
    m_c = upper_c for lambda_c < 0, m_c within the bounds for lambda_c = 0), and it needs no
    step size tuned to the problem: a rare class (m_c << 1) moves by the factor it lacks in one
    step, where gradient ascent on the dual moves its multiplier by only lower_c - m_c (against
    scipy on small problems and a float64 solution on 64x128 images, projected gradient with
    step 1 (the dual's Lipschitz bound) or 2 and FISTA momentum was 10^3 to 10^5 times less
    accurate after 100 steps). Everything is computed in log space with log-sum-exps.

    An upper bound is hard: if the upper bounds of an image's classes cannot be met together
    (every class active and sum_c upper_c < 1) the problem is infeasible and the solver returns
    its last iterate; `size_constraint_loss` reports the violation left.
    """
    probs = _at_least_float32(jnp.asarray(probs))
    log_q = jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))
    return jnp.exp(latent_log_distribution(log_q, lower, upper, active,
                                           slack_weight=slack_weight, iterations=iterations,
                                           step_size=step_size))


def _violation(mass, lower, upper, active):
    """(N,) total violation sum_c of max(lower - mass, 0) + max(mass - upper, 0), active c."""
    excess = jnp.maximum(lower - mass, 0.0) + jnp.maximum(mass - upper, 0.0)
    return jnp.sum(jnp.where(active, excess, 0.0), axis=-1)


def class_weights(stats: SizeStatistics, large_class_fraction: float = LARGE_CLASS_FRACTION,
                  large_class_weight: float = LARGE_CLASS_WEIGHT) -> jax.Array:
    """(C,) gradient weights: large_class_weight for the large classes (alpha_c >
    large_class_fraction: even their small instances fill much of an image, as road or sky
    do), 1 otherwise."""
    alpha = jnp.asarray(stats.alpha, jnp.float32)
    return jnp.where(alpha > large_class_fraction, large_class_weight, 1.0).astype(jnp.float32)


def size_constraint_loss(logits: jax.Array, stats: SizeStatistics, *, slack_weight: float,
                         iterations: int = DEFAULT_ITERATIONS,
                         step_size: float = DEFAULT_STEP_SIZE,
                         large_class_fraction: float = LARGE_CLASS_FRACTION,
                         large_class_weight: float = LARGE_CLASS_WEIGHT
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The constrained multiple-instance loss on unlabelled (target) logits (N, H, W, C).

    Q = softmax(logits) in float32 (or wider); the present classes (`present_classes`, from
    Q's argmax) are bounded to [delta_c, gamma_c]; P = `latent_distribution` of Q under those
    bounds. The gradient with respect to the logits is

        w_c * (Q - P) / (H * W), averaged over the N images,

    the cross-entropy gradient towards the target P, with w_c = large_class_weight where
    alpha_c > large_class_fraction, else 1. Per-class weights on Q - P are not the gradient of
    a weighted cross-entropy, so the loss is a surrogate: its value is the (unweighted)
    cross-entropy of P against Q averaged over pixels and images, for logging, and its gradient
    is exactly the one above (sum(w * stop_gradient(Q - P) * logits) / (N H W), added with its
    value subtracted). No gradient flows through the solver.

    Metrics (scalars, averaged over the images): "cross_entropy" of P against Q,
    "present_classes" (number per image), "violation_before" and "violation_after" (sum over
    the present classes of the distance of the mean mass from [delta_c, gamma_c], for Q and
    for P; after, it is the slack used, plus any upper-bound violation left).
    """
    if logits.ndim != 4 or logits.shape[-1] != len(stats.alpha):
        raise ValueError(f"size_constraint_loss: expected logits (N, H, W, {len(stats.alpha)}), "
                         f"got shape {tuple(logits.shape)}")
    n, h, w, c = logits.shape
    logits = _at_least_float32(logits)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(log_q)
    active = present_classes(jax.lax.stop_gradient(logits), stats)
    lower = jnp.broadcast_to(jnp.asarray(stats.delta, logits.dtype), (n, c))
    upper = jnp.broadcast_to(jnp.asarray(stats.gamma, logits.dtype), (n, c))
    log_p = latent_log_distribution(log_q, lower, upper, active, slack_weight=slack_weight,
                                    iterations=iterations, step_size=step_size)
    p = jnp.exp(log_p)
    weights = class_weights(stats, large_class_fraction, large_class_weight).astype(logits.dtype)
    surrogate = jnp.sum(weights * jax.lax.stop_gradient(q - p) * logits) / (n * h * w)
    cross_entropy = -jnp.sum(p * jax.lax.stop_gradient(log_q)) / (n * h * w)
    loss = cross_entropy + surrogate - jax.lax.stop_gradient(surrogate)

    q_mass = jax.lax.stop_gradient(q).reshape(n, -1, c).mean(axis=1)
    p_mass = p.reshape(n, -1, c).mean(axis=1)
    metrics = {
        "cross_entropy": cross_entropy,
        "present_classes": jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32)),
        "violation_before": jnp.mean(_violation(q_mass, lower, upper, active)),
        "violation_after": jnp.mean(_violation(p_mass, lower, upper, active)),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- the command


def source_label_maps(config, max_images: int | None = None
                      ) -> tuple[Iterator[np.ndarray], int, str]:
    """(label maps, how many, dataset description) of config.data.source's training split.

    Labels are read as training reads them (the same dataset, builder-config overrides, split
    and id table into config.data.class_set: `lsd_jax.data.pipeline`), but at the stored
    resolution, without the training resize, crops or flips. Imports TensorFlow.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from lsd_jax.data import pipeline

    tfds.disable_progress_bar()
    data, source = config.data, config.data.source
    builder = pipeline.load_builder(source.name, data.data_dir, source.manual_dir,
                                    source.config_overrides.to_dict())
    _, _, table_np = pipeline.label_source(builder, data.class_set)
    table = tf.constant(table_np, tf.int32)
    total = builder.info.splits[source.split].num_examples
    if max_images is not None:
        total = min(total, max_images)

    def label_of(image_bytes, label_bytes):
        # decode_pair as training does; tf.data prunes the image decode, whose result is unused.
        return pipeline.decode_pair(image_bytes, label_bytes, table)[1]

    ds = pipeline.read_encoded(builder, source.split, shuffle=False, seed=None)
    ds = ds.map(label_of, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = f"{builder.info.full_name}:{source.split}"
    return iter(ds.take(total).as_numpy_iterator()), total, dataset


def _with_progress(items: Iterator, total: int, what: str) -> Iterator:
    """items, printing a line at every ~10% of total."""
    every = max(1, math.ceil(total / 10))
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        if done % every == 0 or done == total:
            print(f"{what}: {done}/{total} ({100 * done // max(total, 1)}%)", flush=True)


def write_source_statistics(config, output: str, max_images: int | None = None
                            ) -> SizeStatistics:
    """Compute the size statistics of config.data.source's training labels and save them."""
    from lsd_jax.data import classes
    from lsd_jax.errors import ConfigError

    source, class_set = config.data.source, config.data.class_set
    if len(classes.class_set(class_set)) != config.num_classes:
        raise ConfigError(f"config.num_classes={config.num_classes} but config.data.class_set="
                          f"{class_set!r} has {len(classes.class_set(class_set))} classes")
    print(f"size statistics of {source.name}:{source.split} in {config.data.class_set} "
          "(labels at the stored resolution, no crops or flips)", flush=True)
    labels, total, dataset = source_label_maps(config, max_images)
    stats = class_size_statistics(_with_progress(labels, total, "label maps"),
                                  config.num_classes)
    save_statistics(output, stats, dataset=dataset, class_set=config.data.class_set)
    print(f"wrote the size statistics of {stats.num_images} images to {output}", flush=True)
    return stats


def define_flags() -> None:
    """The command's own flags (besides --config), on absl's global FLAGS."""
    from absl import flags

    flags.DEFINE_string("output", None, "Where to write the statistics (JSON).")
    flags.DEFINE_integer("max_images", None, "Read only the first N source images (in the "
                         "stored order).", lower_bound=1)
    flags.mark_flag_as_required("output")


def _command() -> None:
    """`python -m lsd_jax.size_constraints`."""
    from lsd_jax.commands import run_config_command

    run_config_command(
        "lsd_jax.size_constraints", define_flags,
        lambda FLAGS: write_source_statistics(FLAGS.config, FLAGS.output, FLAGS.max_images))


if __name__ == "__main__":
    _command()
