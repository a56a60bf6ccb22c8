"""DACS's strong transform (colour jitter, then Gaussian blur), and the conversions between F's
input and images in [0, 1]: shared by self-training (the mixed and masked images, optionally its
source term) and the source-only baseline's optional augmentation (docs/methods.md, sections 7
and 12). torchvision's and kornia's operations, as the references use them; every draw from the
key given.
"""

import jax
import jax.numpy as jnp

from lsd_jax.models import VGG_MEAN_BGR


def _grey(rgb: jax.Array) -> jax.Array:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale, keeping a channel axis."""
    return (0.299 * rgb[..., 0:1] + 0.587 * rgb[..., 1:2] + 0.114 * rgb[..., 2:3])


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> (hue in [0, 1), saturation, value), as torchvision's _rgb2hsv."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(value == r, ((g - b) / safe) % 6.0,
                    jnp.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = jnp.where(chroma > 0, hue / 6.0, 0.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """The inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = jnp.stack([5.0, 3.0, 1.0])
    k = (k + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * jnp.clip(
        jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def colour_jitter(key: jax.Array, rgb: jax.Array, strength: float) -> jax.Array:
    """One image (H, W, 3, RGB in [0, 1]): brightness, contrast and saturation factors from
    U(1 - s, 1 + s), then a hue shift from U(-s, s) of the colour circle, each clipped to
    [0, 1] (torchvision's ColorJitter in a fixed order: it draws the order at random)."""
    kb, kc, ks, kh = jax.random.split(key, 4)
    factor = lambda k: jax.random.uniform(k, (), minval=max(0.0, 1 - strength),  # noqa: E731
                                          maxval=1 + strength)
    rgb = jnp.clip(rgb * factor(kb), 0.0, 1.0)
    mean = jnp.mean(_grey(rgb))
    rgb = jnp.clip((rgb - mean) * factor(kc) + mean, 0.0, 1.0)
    grey = _grey(rgb)
    rgb = jnp.clip((rgb - grey) * factor(ks) + grey, 0.0, 1.0)
    hsv = rgb_to_hsv(rgb)
    shift = jax.random.uniform(kh, (), minval=-strength, maxval=strength)
    return jnp.clip(hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)), 0.0, 1.0)


def blur_kernel_size(height: int) -> int:
    """The references' kernel size: about a tenth of the image height, odd."""
    size = -(-height // 10)
    return size if size % 2 else size - 1


def gaussian_blur(image: jax.Array, sigma: jax.Array, size: int) -> jax.Array:
    """One image (H, W, C) blurred by a separable Gaussian of `size` taps, reflected borders."""
    taps = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    weights = jnp.exp(-0.5 * jnp.square(taps / sigma))
    weights = weights / jnp.sum(weights)
    half = size // 2
    padded = jnp.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect")
    rows = sum(weights[i] * padded[i:i + image.shape[0]] for i in range(size))
    return sum(weights[i] * rows[:, i:i + image.shape[1]] for i in range(size))


_NOISE = 4  # the stream of an image's key for the sensor noise (the other draws: its split)


def sensor_noise(key: jax.Array, rgb: jax.Array, probability: float,
                 std_range: tuple[float, float]) -> jax.Array:
    """One image in [0, 1] with, at the given probability, per-pixel Gaussian noise of a std
    drawn from U(std_range), clipped to [0, 1]."""
    k_apply, k_std, k_pixels = jax.random.split(key, 3)
    std = jax.random.uniform(k_std, (), minval=std_range[0], maxval=std_range[1])
    noisy = jnp.clip(rgb + std * jax.random.normal(k_pixels, rgb.shape, rgb.dtype), 0.0, 1.0)
    return jnp.where(jax.random.uniform(k_apply) < probability, noisy, rgb)


def strong_augment(key: jax.Array, image01_bgr: jax.Array, block) -> jax.Array:
    """A batch of BGR images in [0, 1], each with its own draws: colour jitter (probability
    `jitter_probability`) then Gaussian blur (probability `blur_probability`, sigma from
    U(blur_sigma)), as DACS's strong transform of the mixed images (no flip). With
    `noise_probability` > 0 (not DACS's; off by default), sensor noise last."""
    size = blur_kernel_size(image01_bgr.shape[1])
    low, high = block.blur_sigma

    def one(key, bgr):
        k_jitter, k_apply_jitter, k_apply_blur, k_sigma = jax.random.split(key, 4)
        rgb = bgr[..., ::-1]
        jittered = colour_jitter(k_jitter, rgb, block.jitter_strength)
        rgb = jnp.where(jax.random.uniform(k_apply_jitter) < block.jitter_probability,
                        jittered, rgb)
        sigma = jax.random.uniform(k_sigma, (), minval=low, maxval=high)
        blurred = gaussian_blur(rgb, sigma, size)
        rgb = jnp.where(jax.random.uniform(k_apply_blur) < block.blur_probability, blurred, rgb)
        if block.noise_probability > 0:  # a Python branch: DACS's transform is untouched
            rgb = sensor_noise(jax.random.fold_in(key, _NOISE), rgb, block.noise_probability,
                               tuple(block.noise_std))
        return rgb[..., ::-1]

    return jax.vmap(one)(jax.random.split(key, image01_bgr.shape[0]), image01_bgr)


def strongly_augmented(key: jax.Array, f_input: jax.Array, block) -> jax.Array:
    """`strong_augment` on a batch of F's inputs, as F's inputs."""
    return f_view(strong_augment(key, image01(f_input), block))


def f_view(image01_bgr: jax.Array) -> jax.Array:
    """F's input from BGR in [0, 1]: BGR 0-255 minus the Caffe mean (the pipeline's view)."""
    return image01_bgr * 255.0 - jnp.asarray(VGG_MEAN_BGR, image01_bgr.dtype)


def image01(f_input: jax.Array) -> jax.Array:
    """The inverse of `f_view` (the pipeline clips to 0-255 before, so this is in [0, 1])."""
    return (f_input + jnp.asarray(VGG_MEAN_BGR, f_input.dtype)) / 255.0


def check_number(block, name: str, low: float, high: float, closed_high: bool = True) -> None:
    """`block[name]` is a number in [low, high] (or [low, high)), or an error naming
    config.dacs's field."""
    value = block[name]
    if (not isinstance(value, (int, float)) or not low <= value
            or not (value <= high if closed_high else value < high)):
        bound = "]" if closed_high else ")"
        raise ValueError(f"config.dacs.{name}={value!r}: expected a number in "
                         f"[{low}, {high}{bound}")


def check_values(block) -> None:
    """The transform's values in `block` (config.dacs), or an error naming the field."""
    check_number(block, "jitter_strength", 0.0, 0.5)
    for name in ("jitter_probability", "blur_probability", "noise_probability"):
        check_number(block, name, 0.0, 1.0)
    std = tuple(block.noise_std)
    if len(std) != 2 or not 0 <= std[0] <= std[1]:
        raise ValueError(f"config.dacs.noise_std={block.noise_std!r}: expected (low, high) "
                         "with 0 <= low <= high, in units of the image's 0-1 range")
    sigma = tuple(block.blur_sigma)
    if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
        raise ValueError(f"config.dacs.blur_sigma={block.blur_sigma!r}: expected (low, high) "
                         "with 0 < low <= high")
