"""The losses of the output-space methods, AdaptSegNet and ADVENT (docs/methods.md, section 8).

Domain labels: source 0, target 1. Every reduction is a mean (over D's map, or over pixels) in
float32 or wider, as in the reference codes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.models.layers import at_least_float32

SOURCE, TARGET = 0, 1
GAN_LOSSES = ("bce", "ls")


def gan_loss(logits: jax.Array, domain: int, kind: str = "bce") -> jax.Array:
    """D's raw output against a constant map of `domain`, averaged over the map: binary
    cross-entropy with logits ("bce"), or the LS-GAN squared error of the raw output ("ls")."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"gan_loss: kind must be one of {GAN_LOSSES}, got {kind!r}")
    if domain not in (SOURCE, TARGET):
        raise ValueError(f"gan_loss: domain must be {SOURCE} (source) or {TARGET} (target), "
                         f"got {domain!r}")
    x = at_least_float32(logits)
    if kind == "ls":
        return jnp.mean(jnp.square(x - domain))
    # -[y log s(x) + (1 - y) log(1 - s(x))] = softplus(x) - y x, stable for any x.
    return jnp.mean(jax.nn.softplus(x) - domain * x)


def self_information(logits: jax.Array) -> jax.Array:
    """ADVENT's per-class self-information map of softmax(logits) over the last axis,
    -P log2(P + 1e-30) / log2(C): (N, H, W, C), each pixel's sum its entropy normalised to
    [0, 1]."""
    probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
    num_classes = logits.shape[-1]
    return -probs * jnp.log2(probs + 1e-30) / np.log2(num_classes)


def entropy_loss(logits: jax.Array) -> jax.Array:
    """MinEnt's term: the normalised entropy of every pixel (the self-information summed over
    classes), averaged over pixels and images."""
    return jnp.mean(jnp.sum(self_information(logits), axis=-1))
