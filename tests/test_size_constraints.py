"""The size constraints of FCNs in the Wild: source statistics, their file, presence, the latent
distribution against scipy on the primal, the loss's gradient, and the command end to end."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from lsd_jax import size_constraints as sc
from train_helpers import REPO_ROOT, TINY_SCENES, subprocess_env

# ----------------------------------------------------------------------------- statistics

IGNORE = 255


def hand_label_maps():
    """Three label maps of 4 classes with fractions counted by hand (class 3 in none)."""
    first = np.array([[0, 0, 0, 0, 1],
                      [1, IGNORE, IGNORE, 2, 2]])       # of 10: c0 4, c1 2, c2 2, 2 ignored
    second = np.array([[0, 0, 0, 0, 0],
                       [0, 0, 0, 1, IGNORE]])           # of 10: c0 8, c1 1
    third = np.full((4, 5), 2)                          # of 20: c0 5, c2 15
    third[0, :] = 0
    return [first, second, third]


def test_statistics_hand_computed():
    stats = sc.class_size_statistics(iter(hand_label_maps()), num_classes=4)
    # Fractions of all pixels, ignored ones included (first map: 4/10, not 4/8).
    fractions = {0: [0.4, 0.8, 0.25], 1: [0.2, 0.1], 2: [0.2, 0.75]}
    np.testing.assert_array_equal(stats.count, [3, 2, 2, 0])
    assert stats.num_images == 3 and stats.num_classes == 4
    # By hand, numpy's linear interpolation: sorted c0 (0.25, 0.4, 0.8), 10th percentile at
    # position 0.2 -> 0.25 + 0.2 * 0.15; 90th at 1.8 -> 0.4 + 0.8 * 0.4.
    np.testing.assert_allclose(stats.alpha[0], 0.28)
    np.testing.assert_allclose(stats.gamma[0], 0.72)
    np.testing.assert_allclose(stats.delta[0], 1.45 / 3)
    for c, values in fractions.items():
        np.testing.assert_allclose(stats.alpha[c], np.percentile(values, 10))
        np.testing.assert_allclose(stats.delta[c], np.mean(values))
        np.testing.assert_allclose(stats.gamma[c], np.percentile(values, 90))
    # The absent class: zeros.
    assert stats.alpha[3] == stats.delta[3] == stats.gamma[3] == 0


def test_statistics_other_ignore_label():
    maps = [np.array([[0, 7], [7, 7]])]
    stats = sc.class_size_statistics(maps, num_classes=2, ignore_label=7)
    np.testing.assert_array_equal(stats.count, [1, 0])
    assert stats.delta[0] == 0.25
    with pytest.raises(ValueError, match=r"label map 0: label value 7 .*\[0, 2\)"):
        sc.class_size_statistics(maps, num_classes=2)


@pytest.mark.parametrize("bad, pattern", [
    (4, r"label map 1: label value 4 is outside \[0, 4\)"),
    (-1, r"label map 1: label value -1 is outside \[0, 4\)"),
])
def test_statistics_bad_label(bad, pattern):
    maps = hand_label_maps()
    maps[1][0, 2] = bad
    with pytest.raises(ValueError, match=pattern):
        sc.class_size_statistics(maps, num_classes=4)


def test_statistics_bad_input():
    with pytest.raises(ValueError, match=r"label map 1: expected a 2-D integer"):
        sc.class_size_statistics([np.zeros((2, 2), int), np.zeros((2, 2, 1), int)], 4)
    with pytest.raises(ValueError, match=r"label map 0: expected a 2-D integer.*float"):
        sc.class_size_statistics([np.zeros((2, 2))], 4)
    with pytest.raises(ValueError, match="no label maps"):
        sc.class_size_statistics([], 4)


def test_mean_may_lie_outside_the_percentiles(tmp_path):
    """19 images with 1% of class 0 and one with 100%: the mean is above the 90th percentile.
    Such statistics are valid: they save and load."""
    maps = [np.where(np.arange(100).reshape(10, 10) < 1, 0, IGNORE) for _ in range(19)]
    maps.append(np.zeros((10, 10), int))
    stats = sc.class_size_statistics(maps, num_classes=1)
    assert stats.gamma[0] == pytest.approx(0.01) and stats.delta[0] == pytest.approx(0.0595)
    path = str(tmp_path / "stats.json")
    sc.save_statistics(path, stats, dataset="d", class_set="s")
    assert sc.load_statistics(path, 1).delta[0] == stats.delta[0]


# ----------------------------------------------------------------------------- the file


@pytest.fixture
def saved(tmp_path):
    stats = sc.class_size_statistics(hand_label_maps(), num_classes=4)
    path = str(tmp_path / "sub" / "stats.json")
    sc.save_statistics(path, stats, dataset="synthetic_scenes/source:train",
                       class_set="cityscapes19")
    return path, stats


def test_save_load_round_trip(saved):
    path, stats = saved
    assert os.listdir(os.path.dirname(path)) == ["stats.json"]  # no temporary file left
    record = json.load(open(path))
    assert record["format"] == sc.FILE_FORMAT and record["version"] == sc.FILE_VERSION
    assert record["dataset"] == "synthetic_scenes/source:train"
    assert record["class_set"] == "cityscapes19" and record["num_images"] == 3
    loaded = sc.load_statistics(path, 4, class_set="cityscapes19")
    for field in ("alpha", "delta", "gamma", "count"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(stats, field))
    assert loaded.count.dtype == np.int64 and loaded.alpha.dtype == np.float64
    assert loaded.num_images == 3


def rewrite(path, change):
    record = json.load(open(path))
    change(record)
    with open(path, "w") as f:
        json.dump(record, f)


def set_class(field, c, value):
    def change(record):
        record[field][c] = value
    return change


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.pop("gamma"), r"field 'gamma' is missing"),
    (lambda r: r["delta"].append(0.5), r"field 'delta' has 5 entries, expected 4"),
    (set_class("alpha", 0, 0.9), r"field 'alpha' of class 0 is 0.9 .*at most gamma"),
    (set_class("gamma", 1, 1.5), r"field 'gamma' of class 1 is 1.5, expected a fraction"),
    (set_class("alpha", 1, 0.0), r"field 'alpha' of class 1 is 0.0 .*positive"),
    (set_class("delta", 3, 0.2), r"field 'alpha' of class 3 .*delta 0.2.*where count is 0"),
    (set_class("count", 2, 7), r"field 'count' of class 2 is 7, expected 0 to num_images=3"),
    (set_class("count", 2, 1.5), r"field 'count' must hold integers"),
    (lambda r: r.update(format="other"), r"field 'format' is 'other'"),
    (lambda r: r.update(version=2), r"field 'version' is 2"),
])
def test_load_rejects_malformed(saved, change, pattern):
    path, _ = saved
    rewrite(path, change)
    with pytest.raises(ValueError, match=pattern) as error:
        sc.load_statistics(path, 4)
    assert path in str(error.value)


def test_load_errors_name_the_path(saved, tmp_path):
    path, _ = saved
    with pytest.raises(ValueError, match=r"field 'alpha' has 4 entries, expected 19") as error:
        sc.load_statistics(path, 19)
    assert path in str(error.value)
    with pytest.raises(ValueError, match=r"field 'class_set' is 'cityscapes19', expected "
                                         r"'synthia16'"):
        sc.load_statistics(path, 4, class_set="synthia16")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ')
    with pytest.raises(ValueError, match=r"broken.json: not JSON"):
        sc.load_statistics(str(broken), 4)
    with pytest.raises(FileNotFoundError, match=r"missing.json: no such file"):
        sc.load_statistics(str(tmp_path / "missing.json"), 4)


# ----------------------------------------------------------------------------- presence


def stats_of(alpha, delta=None, gamma=None, count=None):
    alpha = np.asarray(alpha, float)
    return sc.SizeStatistics(
        alpha, alpha if delta is None else np.asarray(delta, float),
        alpha if gamma is None else np.asarray(gamma, float),
        (alpha > 0).astype(np.int64) if count is None else np.asarray(count, np.int64), 10)


def one_hot_probs(predicted, num_classes):
    """(N, H, W) predicted classes -> probabilities whose argmax they are."""
    return np.asarray(jax.nn.one_hot(np.asarray(predicted), num_classes) * 0.7 + 0.3 / num_classes)


def test_present_classes():
    # alpha: thresholds 0.1 * alpha = 0.05, 0.1, -, 0.03; class 2 was never seen (count 0).
    stats = stats_of([0.5, 1.0, 0.0, 0.3], count=[4, 2, 0, 3])
    predicted = np.array([
        [[0, 3, 3, 3, 3], [2, 2, 2, 2, 2]],   # d = 0.1, 0, 0.5, 0.4
        [[1, 3, 3, 3, 3], [3, 3, 3, 3, 3]],   # d = 0, 0.1 (not above 0.1 * 1.0), 0, 0.9
    ])
    probs = one_hot_probs(predicted, 4)
    expected = [[True, False, False, True], [False, False, False, True]]
    np.testing.assert_array_equal(sc.present_classes(probs, stats), expected)
    np.testing.assert_array_equal(jax.jit(sc.present_classes)(probs, stats), expected)
    # Two pixels of class 1 are above its threshold.
    predicted[1, 0, 1] = 1
    assert sc.present_classes(one_hot_probs(predicted, 4), stats)[1, 1]
    with pytest.raises(ValueError, match=r"expected probs \(N, H, W, 4\)"):
        sc.present_classes(probs[..., :3], stats)


# ----------------------------------------------------------------------------- the solver


def reference_solution(q, lower, upper, active, slack_weight):
    """The primal, min 1/M sum KL(P||Q) + slack_weight * sum xi, by scipy's SLSQP in float64."""
    m, c = q.shape
    classes = np.flatnonzero(active)
    k = len(classes)

    def split(x):
        return x[:m * c].reshape(m, c), x[m * c:]

    def objective(x):
        p, xi = split(x)
        return np.sum(p * (np.log(p) - np.log(q))) / m + slack_weight * np.sum(xi)

    def gradient(x):
        p, _ = split(x)
        return np.concatenate([((np.log(p) - np.log(q) + 1) / m).ravel(),
                               np.full(k, slack_weight)])

    simplex = np.hstack([np.kron(np.eye(m), np.ones((1, c))), np.zeros((m, k))])
    mass = np.zeros((k, m * c + k))  # mass @ x = mean_hw P(c) of the active classes
    for j, cls in enumerate(classes):
        mass[j, cls:m * c:c] = 1 / m
    slack = np.hstack([np.zeros((k, m * c)), np.eye(k)])
    constraints = [
        {"type": "eq", "fun": lambda x: simplex @ x - 1, "jac": lambda x: simplex},
        {"type": "ineq", "fun": lambda x: (mass + slack) @ x - lower[classes],
         "jac": lambda x: mass + slack},
        {"type": "ineq", "fun": lambda x: upper[classes] - mass @ x, "jac": lambda x: -mass},
    ]
    x0 = np.concatenate([q.ravel(), np.maximum(lower[classes] - q.mean(0)[classes], 0)])
    result = scipy.optimize.minimize(
        objective, x0, jac=gradient, method="SLSQP", constraints=constraints,
        bounds=[(1e-12, 1)] * (m * c) + [(0, None)] * k,
        options={"ftol": 1e-13, "maxiter": 1000})
    return split(result.x)[0], objective(result.x)


def softmax_rows(rng, m, c, scale, bias):
    logits = rng.normal(size=(m, c)) * scale + np.asarray(bias, float)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def solver_cases():
    """(name, Q, lower, upper, active, slack_weight, the constraint that must bind)."""
    rng = np.random.default_rng(0)
    cases = []
    q = softmax_rows(rng, 12, 4, 1.0, [1, 0, -2, 0])   # class 2 rare, mass ~0.05
    cases.append(("lower binds", q, np.array([0, 0, 0.3, 0]), np.array([1, 1, 0.6, 1]),
                  np.array([False, False, True, False]), 10.0, ("lower", 2)))
    q = softmax_rows(rng, 12, 4, 1.0, [2, 0, 0, 0])    # class 0 dominant
    cases.append(("upper binds", q, np.array([0.1, 0, 0, 0]), np.array([0.3, 1, 1, 1]),
                  np.array([True, False, False, False]), 10.0, ("upper", 0)))
    q = softmax_rows(rng, 8, 3, 2.0, [0, 0, 0])        # lower bounds summing to 1.5
    cases.append(("lower bounds infeasible: slack", q, np.full(3, 0.5), np.ones(3),
                  np.ones(3, bool), 1.0, ("slack", 0)))
    q = softmax_rows(rng, 10, 4, 1.0, [0, 0, -3, 0])   # a rare class, a cheap slack
    cases.append(("slack weight caps the lower multiplier", q, np.array([0, 0, 0.9, 0]),
                  np.ones(4), np.array([False, False, True, False]), 0.5, ("slack", 2)))
    q = softmax_rows(rng, 12, 4, 1.5, [1, 1, -1, 0])   # both kinds, and inactive bounds
    cases.append(("mixed, inactive classes ignored", q, np.array([0, 0, 0.25, 0.6]),
                  np.array([0.15, 1, 0.5, 0.05]), np.array([True, False, True, False]),
                  5.0, ("upper", 0)))
    q = softmax_rows(rng, 6, 3, 1.0, [0, -1, 0])       # lower above upper (delta > gamma)
    cases.append(("lower above upper", q, np.array([0, 0.4, 0]), np.array([1, 0.2, 1]),
                  np.array([False, True, False]), 3.0, ("upper", 1)))
    q = softmax_rows(rng, 9, 3, 1.0, [0, 0, 0])
    cases.append(("nothing active", q, np.full(3, 0.9), np.full(3, 0.01), np.zeros(3, bool),
                  1.0, None))
    return cases


# max |P - P_scipy| measured with the defaults (100 steps of size 1): below 2e-6 on every case.
SOLVER_TOLERANCE = 1e-4


@pytest.mark.parametrize("case", solver_cases(), ids=lambda case: case[0])
def test_solver_matches_scipy(case):
    name, q, lower, upper, active, slack_weight, binding = case
    p_ref, objective_ref = reference_solution(q, lower, upper, active, slack_weight)
    solve = jax.jit(functools.partial(sc.latent_distribution, slack_weight=slack_weight))
    p = np.asarray(solve(q[None].astype(np.float32), lower, upper, active))[0]
    np.testing.assert_allclose(p, p_ref, atol=SOLVER_TOLERANCE, rtol=0)
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-5)
    mass, mass_q = p.mean(0), q.mean(0)
    # The hard upper bounds hold, the case binds what it is meant to, and the optimum is
    # not worse than scipy's (same objective within the tolerance).
    assert np.all(mass[active] <= upper[active] + SOLVER_TOLERANCE)
    if binding is None:
        np.testing.assert_allclose(p, q, atol=1e-6)
    else:
        kind, c = binding
        if kind == "slack":  # the lower bound is left unmet
            assert mass[c] < min(lower[c], upper[c]) - 0.05
        else:  # the mass is moved onto the bound (from Q's mass at least 0.05 away)
            bound = lower[c] if kind == "lower" else upper[c]
            assert abs(mass_q[c] - bound) > 0.05 and mass[c] == pytest.approx(bound, abs=1e-4)
    slack = np.maximum(np.minimum(lower, upper) - mass, 0)[active].sum()
    objective = (np.sum(p * (np.log(p) - np.log(q))) / len(q) + slack_weight * slack
                 + slack_weight * np.maximum(lower - upper, 0)[active].sum())
    assert objective <= objective_ref + 1e-5


def test_solver_batches_images_and_keeps_spatial_shape():
    """Images of one batch are independent problems, and (N, H, W, C) comes back as such."""
    cases = [c for c in solver_cases() if c[1].shape == (12, 4)]
    assert len(cases) == 3
    q = np.stack([c[1] for c in cases]).astype(np.float32)
    lower, upper, active = (np.stack([c[i] for c in cases]) for i in (2, 3, 4))
    solve = jax.jit(functools.partial(sc.latent_distribution, slack_weight=5.0))
    together = np.asarray(solve(q.reshape(3, 3, 4, 4), lower, upper, active))
    assert together.shape == (3, 3, 4, 4)
    for i in range(3):
        alone = np.asarray(solve(q[i:i + 1], lower[i:i + 1], upper[i:i + 1], active[i:i + 1]))
        np.testing.assert_allclose(together[i].reshape(12, 4), alone[0], atol=1e-6)
    # (C,) bounds broadcast over the batch.
    shared = np.asarray(solve(q, lower[0], upper[0], active[0]))
    np.testing.assert_allclose(shared[0], np.asarray(solve(q[:1], lower[:1], upper[:1],
                                                           active[:1]))[0], atol=1e-6)


def test_solver_converges_with_the_default_steps():
    """Confident predictions on a 32x32 image with 6 of 8 classes bounded: the default
    iteration count reaches the same P as ten times as many steps."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 32, 32, 8)) * 6 + rng.normal(size=8) * 2
    q = np.asarray(jax.nn.softmax(logits, -1))
    mass = q.mean((1, 2))
    lower, upper = mass * 1.8 + 0.02, mass * 0.5 + 0.01
    upper = np.where(np.arange(8) % 2, upper, 1.0)
    lower = np.where(np.arange(8) % 2, 0.0, np.minimum(lower, 0.9))
    active = np.broadcast_to(np.arange(8) < 6, (2, 8))
    solve = jax.jit(sc.latent_distribution, static_argnames=("iterations",))
    p = np.asarray(solve(q, lower, upper, active, slack_weight=4.0))
    p_long = np.asarray(solve(q, lower, upper, active, slack_weight=4.0, iterations=1000))
    np.testing.assert_allclose(p, p_long, atol=1e-4)
    p_mass = p_long.mean((1, 2))
    assert np.all(p_mass[active & (upper < 1)] <= upper[active & (upper < 1)] + 1e-5)
    assert np.abs(p - q).max() > 0.1  # the constraints did change P


# ----------------------------------------------------------------------------- the loss

LOSS_SETTINGS = {"slack_weight": 3.0, "iterations": 100, "step_size": 1.0}


def loss_example():
    """Logits (2, 3, 4, 4) and statistics with a large class (0: alpha 0.3 > 0.1) and a class
    never seen in the source (3)."""
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(2, 3, 4, 4)) * 2 + [1.5, 0, -1, 0.5]).astype(np.float32)
    stats = sc.SizeStatistics(alpha=np.array([0.3, 0.05, 0.02, 0.0]),
                              delta=np.array([0.5, 0.3, 0.25, 0.0]),
                              gamma=np.array([0.6, 0.45, 0.4, 0.0]),
                              count=np.array([9, 5, 4, 0]), num_images=10)
    return logits, stats


def test_loss_gradient_is_weighted_q_minus_p():
    logits, stats = loss_example()
    loss_fn = functools.partial(sc.size_constraint_loss, stats=stats, **LOSS_SETTINGS)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logits)

    # Independently: P solved on its own (eager, then numpy), the gradient by the formula.
    q = np.asarray(jax.nn.softmax(logits.astype(np.float64), -1))
    active = np.asarray(sc.present_classes(q, stats))
    assert active.sum() >= 3 and not active[:, 3].any()
    p = np.asarray(sc.latent_distribution(q.astype(np.float32), stats.delta, stats.gamma, active,
                                          slack_weight=3.0), np.float64)
    weights = np.array([0.1, 1, 1, 1])
    expected = weights * (q - p) / (2 * 3 * 4)
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    # The test has teeth: P differs from Q, and the weights matter.
    assert np.abs(q - p).max() > 0.05
    assert np.abs(grad - (q - p) / 24).max() > 1e-3
    # The value is the cross-entropy of P against Q, as is the metric.
    ce = -np.sum(p * np.log(q)) / 24
    assert float(loss) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["cross_entropy"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["present_classes"]) == active.sum() / 2
    mass_q, mass_p = q.mean((1, 2)), p.mean((1, 2))

    def violation(mass):
        excess = np.maximum(stats.delta - mass, 0) + np.maximum(mass - stats.gamma, 0)
        return np.sum(np.where(active, excess, 0)) / 2

    assert float(metrics["violation_before"]) == pytest.approx(violation(mass_q), rel=1e-5)
    assert float(metrics["violation_after"]) == pytest.approx(violation(mass_p), abs=1e-6)
    assert violation(mass_q) > 0.1 and violation(mass_p) < violation(mass_q) / 2


def test_loss_jit_equals_eager():
    logits, stats = loss_example()

    def value_and_grad(logits, stats):
        return jax.value_and_grad(
            lambda x: sc.size_constraint_loss(x, stats, **LOSS_SETTINGS), has_aux=True)(logits)

    (loss, metrics), grad = value_and_grad(logits, stats)
    results = {"stats traced": jax.jit(value_and_grad)(logits, stats),
               "stats constant": jax.jit(lambda x: value_and_grad(x, stats))(logits)}
    for how, ((loss_j, metrics_j), grad_j) in results.items():
        np.testing.assert_allclose(loss_j, loss, rtol=1e-5, err_msg=how)
        np.testing.assert_allclose(grad_j, grad, rtol=1e-4, atol=1e-7, err_msg=how)
        for key in metrics:
            np.testing.assert_allclose(metrics_j[key], metrics[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{how}: {key}")


def test_loss_bfloat16_logits_are_reduced_in_float32():
    logits, stats = loss_example()
    loss_fn = functools.partial(sc.size_constraint_loss, stats=stats, **LOSS_SETTINGS)
    (loss, _), grad = jax.value_and_grad(loss_fn, has_aux=True)(logits)
    low = jnp.asarray(logits, jnp.bfloat16)
    (loss_bf, _), grad_bf = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(low)
    assert loss_bf.dtype == jnp.float32 and grad_bf.dtype == jnp.bfloat16
    # The same up to the rounding of the logits to bfloat16.
    np.testing.assert_allclose(loss_bf, loss, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(grad_bf, np.float32), grad, atol=2e-3)


def test_loss_rejects_wrong_class_count():
    logits, stats = loss_example()
    with pytest.raises(ValueError, match=r"expected logits \(N, H, W, 4\)"):
        sc.size_constraint_loss(logits[..., :3], stats, slack_weight=1.0)
    with pytest.raises(ValueError, match=r"slack_weight must be >= 0, got -1.0"):
        sc.size_constraint_loss(logits, stats, slack_weight=-1.0)
    with pytest.raises(ValueError, match=r"iterations must be a non-negative Python int"):
        sc.size_constraint_loss(logits, stats, slack_weight=1.0, iterations=2.5)


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow  # a subprocess
def test_module_imports_without_tensorflow():
    code = ("import sys, lsd_jax.size_constraints; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'flax', 'absl.flags') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def run_command(*args):
    return subprocess.run([sys.executable, "-m", "lsd_jax.size_constraints", *args],
                          env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a subprocess
def test_command_end_to_end(tmp_path):
    """The source's labels of a tiny generated synthetic dataset, read by the command as
    training reads them, give the statistics of the scenes' labels drawn here directly."""
    from lsd_jax.data import classes, scenes

    data_dir, output = str(tmp_path / "tfds"), str(tmp_path / "out" / "stats.json")
    overrides = f"--config.data.source.config_overrides={json.dumps(TINY_SCENES)}"
    done = run_command("--config", "configs/synthetic.py", "--output", output,
                       f"--config.data.data_dir={data_dir}", overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == f"wrote the size statistics of 16 images to {output}"
    assert sum("label maps:" in line for line in lines) == 8  # every 2 of 16 images
    assert "label maps: 16/16 (100%)" in lines

    # Source scenes: builder seed 0, split "train" (0), index i, at the tiny size.
    height, width = TINY_SCENES["height"], TINY_SCENES["width"]
    labels = [scenes.render_scene((0, 0, i), height, width, scenes.SOURCE_APPEARANCE)[1]
              for i in range(TINY_SCENES["num_train"])]
    expected = sc.class_size_statistics(labels, 19)
    stats = sc.load_statistics(output, 19, class_set="cityscapes19")
    np.testing.assert_array_equal(stats.count, expected.count)
    np.testing.assert_allclose(stats.alpha, expected.alpha, rtol=1e-12)
    np.testing.assert_allclose(stats.delta, expected.delta, rtol=1e-12)
    np.testing.assert_allclose(stats.gamma, expected.gamma, rtol=1e-12)
    assert stats.count.max() == 16 and (stats.count > 0).sum() >= 10
    record = json.load(open(output))
    assert record["dataset"].startswith("synthetic_scenes/source_") and \
        record["dataset"].endswith(":train")

    # Another class set: ids mapped by the pipeline's table.
    output16 = str(tmp_path / "stats16.json")
    done = run_command("--config", "configs/synthetic.py", "--output", output16,
                       f"--config.data.data_dir={data_dir}", overrides,
                       "--config.data.class_set=synthia16", "--config.num_classes=16")
    assert done.returncode == 0, done.stderr[-3000:]
    table = classes.conversion_table("cityscapes19", "synthia16")
    expected16 = sc.class_size_statistics([table[label] for label in labels], 16)
    stats16 = sc.load_statistics(output16, 16, class_set="synthia16")
    np.testing.assert_array_equal(stats16.count, expected16.count)
    np.testing.assert_allclose(stats16.delta, expected16.delta, rtol=1e-12)
    assert not np.array_equal(stats16.count, stats.count[:16])  # the table did change ids

    # --max_images: the first images in the stored order (which TFDS shuffles on writing).
    output4 = str(tmp_path / "stats4.json")
    done = run_command("--config", "configs/synthetic.py", "--output", output4,
                       "--max_images=4", f"--config.data.data_dir={data_dir}", overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "label maps: 4/4 (100%)" in done.stdout.splitlines()
    stats4 = sc.load_statistics(output4, 19)
    assert stats4.num_images == 4 and stats4.count.max() == 4
    assert np.all(stats4.count <= stats.count) and stats4.count.sum() < stats.count.sum()


@pytest.mark.slow  # a subprocess
def test_command_errors(tmp_path):
    done = run_command("--config", "configs/synthetic.py", "--output", str(tmp_path / "s.json"),
                       "--config.data.no_such_field=1")
    assert done.returncode == 2
    assert "lsd_jax.size_constraints: --config: the config has no field 'no_such_field'" in \
        done.stderr
    assert "Traceback" not in done.stderr
    done = run_command("--config", "configs/synthetic.py", "--output", str(tmp_path / "s.json"),
                       "--config.data.class_set=synthia16")
    assert done.returncode == 1
    assert ("lsd_jax.size_constraints: config.num_classes=19 but config.data.class_set="
            "'synthia16' has 16 classes") in done.stderr
    assert not os.path.exists(tmp_path / "s.json")
