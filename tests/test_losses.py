"""Losses against PyTorch's definitions (the reference's), and aux labels the right way round."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lsd_jax import losses


def random_logits_and_labels(shape=(2, 6, 10), classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((*shape, classes)).astype(np.float32) * 3
    labels = rng.integers(0, classes, shape).astype(np.int32)
    labels[rng.random(shape) < 0.3] = losses.IGNORE_LABEL
    return logits, labels


def torch_ce(logits, labels, reduction):
    return torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long(),
        ignore_index=255, reduction=reduction).item()


def test_ce2d_sum_is_the_reference_sum_over_pixels_divided_by_batch():
    logits, labels = random_logits_and_labels()
    expected = torch_ce(logits, labels, "sum") / logits.shape[0]
    np.testing.assert_allclose(losses.ce2d(jnp.asarray(logits), jnp.asarray(labels)), expected,
                               rtol=1e-5)


def test_ce2d_mean_averages_over_valid_pixels():
    logits, labels = random_logits_and_labels(seed=1)
    expected = torch_ce(logits, labels, "mean")
    np.testing.assert_allclose(losses.ce2d(jnp.asarray(logits), jnp.asarray(labels), "mean"),
                               expected, rtol=1e-5)


def test_ce2d_ignores_255_completely():
    logits, labels = random_logits_and_labels(seed=2)
    changed = logits.copy()
    changed[labels == 255] += 100.0  # whatever is predicted on ignored pixels
    for reduction in losses.REDUCTIONS:
        np.testing.assert_allclose(losses.ce2d(jnp.asarray(changed), jnp.asarray(labels), reduction),
                                   losses.ce2d(jnp.asarray(logits), jnp.asarray(labels), reduction),
                                   rtol=1e-6)
    all_ignored = np.full_like(labels, 255)
    assert float(losses.ce2d(jnp.asarray(logits), jnp.asarray(all_ignored), "mean")) == 0.0


def test_ce2d_rejects_bad_inputs():
    logits, labels = random_logits_and_labels()
    with pytest.raises(ValueError, match="labels"):
        losses.ce2d(jnp.asarray(logits), jnp.asarray(labels[:, :-1]))
    with pytest.raises(ValueError, match="integers"):
        losses.ce2d(jnp.asarray(logits), jnp.asarray(labels, jnp.float32))
    with pytest.raises(ValueError, match="'median'"):
        losses.ce2d(jnp.asarray(logits), jnp.asarray(labels), "median")


def test_domain_labels_and_domain_ce():
    assert (losses.SOURCE_REAL, losses.SOURCE_FAKE, losses.TARGET_REAL, losses.TARGET_FAKE) == \
        (0, 1, 2, 3)
    logits, _ = random_logits_and_labels(classes=4)
    full = np.full(logits.shape[:3], losses.TARGET_FAKE, np.int32)
    np.testing.assert_allclose(losses.domain_ce(jnp.asarray(logits), losses.TARGET_FAKE),
                               torch_ce(logits, full, "sum") / logits.shape[0], rtol=1e-5)



def test_domain_accuracy_counts_patches_whose_top_class_is_the_domain():
    logits = np.zeros((2, 1, 3, 4), np.float32)
    logits[0, 0, :, losses.TARGET_REAL] = 1  # 3 patches right
    logits[1, 0, 0, losses.TARGET_REAL] = 1  # 1 right
    logits[1, 0, 1:, losses.SOURCE_FAKE] = 1  # 2 wrong
    assert float(losses.domain_accuracy(jnp.asarray(logits), losses.TARGET_REAL)) == pytest.approx(4 / 6)
    assert float(losses.domain_accuracy(jnp.asarray(logits), losses.SOURCE_FAKE)) == pytest.approx(2 / 6)

def test_l1_is_mean_absolute_error():
    a, b = np.random.default_rng(0).random((2, 2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.l1(jnp.asarray(a), jnp.asarray(b)),
                               np.abs(a - b).mean(), rtol=1e-6)


@pytest.mark.parametrize("in_hw, out_hw", [((320, 640), (40, 80)), ((512, 1024), (64, 128)),
                                           ((37, 91), (11, 13))])
def test_aux_labels_match_pytorch_nearest_resize_the_right_way_round(in_hw, out_hw):
    labels = np.random.default_rng(0).integers(0, 19, (2, *in_hw)).astype(np.int32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(labels)[:, None].float(), size=out_hw, mode="nearest")[:, 0].long()
    aux = losses.aux_labels(jnp.asarray(labels), out_hw)
    assert aux.shape == (2, *out_hw)
    np.testing.assert_array_equal(aux, expected.numpy())


def test_aux_labels_keep_the_layout():
    """Left half road (0), right half sky (10): still so after resizing (not transposed)."""
    labels = np.zeros((1, 64, 128), np.int32)
    labels[:, :, 64:] = 10
    aux = np.asarray(losses.aux_labels(jnp.asarray(labels), (8, 16)))
    assert (aux[:, :, :8] == 0).all() and (aux[:, :, 8:] == 10).all()
