"""LSD's losses (docs/methods.md, section 3): pixel cross-entropy, L1, domain labels and aux labels.

All reductions run in float32 (or wider) whatever the compute dtype of the logits.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.models.layers import at_least_float32

IGNORE_LABEL = 255

# Per-pixel domain labels of D's out_s head.
SOURCE_REAL, SOURCE_FAKE, TARGET_REAL, TARGET_FAKE = 0, 1, 2, 3

REDUCTIONS = ("sum", "mean")


def ce2d(logits: jax.Array, labels: jax.Array, reduction: str = "sum") -> jax.Array:
    """Softmax cross-entropy per pixel; pixels labelled 255 are excluded.

    Args:
      logits: (N, H, W, C).
      labels: (N, H, W) integer class ids, IGNORE_LABEL for pixels without a label.
      reduction: "sum" (the reference: summed over pixels, divided by the batch size N) or
        "mean" (averaged over the valid pixels; 0 when there are none).
    """
    if logits.ndim != 4 or labels.shape != logits.shape[:3]:
        raise ValueError(f"ce2d: expected logits (N, H, W, C) and labels (N, H, W), got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"ce2d: labels must be integers, got dtype {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"ce2d: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    log_probs = jax.nn.log_softmax(at_least_float32(logits), axis=-1)
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    if reduction == "sum":
        return total / logits.shape[0]
    return total / jnp.maximum(jnp.sum(valid), 1)


def domain_ce(logits: jax.Array, domain: int, reduction: str = "sum") -> jax.Array:
    """ce2d of D's out_s against one domain label at every pixel."""
    labels = jnp.full(logits.shape[:3], domain, jnp.int32)
    return ce2d(logits, labels, reduction)


def domain_accuracy(logits: jax.Array, domain: int) -> jax.Array:
    """Fraction of D's patches whose most likely of the four domain classes is `domain`: how
    often D is right about one kind of input (a diagnostic of the adversarial game)."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == domain)


def l1(image: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error between G's image and the real image, both in [0, 1]."""
    return jnp.mean(jnp.abs(at_least_float32(image) - at_least_float32(target)))


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel for PyTorch's 'nearest' resize: floor(i * in / out)."""
    return np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int32)


def aux_labels(labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Source labels resized (nearest) to D's output size, for D's class head.

    Height stays height and width stays width (the reference swaps them, scrambling the targets).
    """
    if labels.ndim != 3:
        raise ValueError(f"aux_labels: expected labels (N, H, W), got {tuple(labels.shape)}")
    rows = nearest_indices(labels.shape[1], out_hw[0])
    cols = nearest_indices(labels.shape[2], out_hw[1])
    return labels[:, rows][:, :, cols]
