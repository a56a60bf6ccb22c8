"""Pictures for summaries: colourised label maps, F's input back as RGB, and image grids.

numpy only (no TensorFlow, no JAX): it runs on host copies of the arrays.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lsd_jax.data.classes import CITYSCAPES_COLORS, IGNORE_LABEL

# Caffe mean of F's input (B, G, R); the same numbers as lsd_jax.models.VGG_MEAN_BGR (checked by
# a test), repeated here so that this module does not import JAX and Flax.
VGG_MEAN_BGR = (104.00699, 116.66877, 122.67892)


def colorize(label_map: np.ndarray, colors: np.ndarray | None = None,
             ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """RGB uint8 picture (..., H, W, 3) of a class map (..., H, W).

    Args:
      label_map: integer class indices; 255 = ignore.
      colors: (C, 3) uint8 RGB per class; the 19 Cityscapes colours by default.
      ignore_color: colour of ignored pixels (black).
    """
    colors = CITYSCAPES_COLORS if colors is None else np.asarray(colors, np.uint8)
    if colors.ndim != 2 or colors.shape[1] != 3:
        raise ValueError(f"colors: expected shape (C, 3), got {colors.shape}")
    label_map = np.asarray(label_map)
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map: expected integer class indices, got dtype "
                         f"{label_map.dtype}")
    unknown = np.setdiff1d(np.unique(label_map),
                           np.append(np.arange(len(colors)), IGNORE_LABEL))
    if unknown.size:
        raise ValueError(f"label map holds ids {unknown[:10].tolist()} that are neither a class "
                         f"in [0, {len(colors)}) nor {IGNORE_LABEL} (ignore)")
    palette = np.zeros((IGNORE_LABEL + 1, 3), np.uint8)
    palette[:len(colors)] = colors
    palette[IGNORE_LABEL] = ignore_color
    return palette[label_map.astype(np.int64)]


def denormalize_image(image: np.ndarray, mean_bgr: Sequence[float] = VGG_MEAN_BGR
                      ) -> np.ndarray:
    """F's input (..., H, W, 3), BGR 0-255 with the mean subtracted -> RGB uint8."""
    image = np.asarray(image, np.float32)
    _check_channels(image, "F's input")
    bgr = image + np.asarray(mean_bgr, np.float32)
    return _to_uint8(bgr[..., ::-1])


def unit_image_to_rgb(image: np.ndarray, bgr: bool = True) -> np.ndarray:
    """An image in [0, 1] (G's output, D's input; BGR like F's input by default) -> RGB uint8."""
    image = np.asarray(image, np.float32)
    _check_channels(image, "image in [0, 1]")
    return _to_uint8(255.0 * (image[..., ::-1] if bgr else image))


def _check_channels(image: np.ndarray, what: str) -> None:
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: expected (..., H, W, 3), got shape {image.shape}")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of (H, W, ...) to (height, width, ...), pixel centres aligned."""
    image = np.asarray(image)
    rows = ((np.arange(height) + 0.5) * image.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * image.shape[1] / width).astype(np.int64)
    return image[rows][:, cols]


def image_row(panels: Sequence[np.ndarray], padding: int = 4,
              pad_value: int = 255) -> np.ndarray:
    """Panels (H_i, W_i, 3) uint8 side by side, each resized (nearest) to the first's size."""
    if not panels:
        raise ValueError("image_row: expected at least one panel")
    height, width = panels[0].shape[:2]
    gap = np.full((height, padding, 3), pad_value, np.uint8)
    pieces = []
    for i, panel in enumerate(panels):
        panel = np.asarray(panel)
        if panel.ndim != 3 or panel.shape[2] != 3 or panel.dtype != np.uint8:
            raise ValueError(f"panel {i}: expected (H, W, 3) uint8, got {panel.shape} "
                             f"{panel.dtype}")
        if i:
            pieces.append(gap)
        pieces.append(resize_nearest(panel, height, width))
    return np.concatenate(pieces, axis=1)


def summary_grid(image: np.ndarray, reconstruction: np.ndarray | None,
                 prediction: np.ndarray, label: np.ndarray | None = None,
                 colors: np.ndarray | None = None, max_examples: int = 4,
                 mean_bgr: Sequence[float] = VGG_MEAN_BGR) -> np.ndarray:
    """(N, H, W', 3) uint8 rows "input | G's reconstruction | prediction | label" for summaries.

    Args:
      image: F's input batch (N, H, W, 3), BGR mean-subtracted.
      reconstruction: G's output (N, H, W, 3) in [0, 1], BGR; None to leave the panel out.
      prediction: (N, h, w) predicted class indices.
      label: (N, h, w) class indices with 255 = ignore; None to leave the panel out (target).
      colors: (C, 3) RGB per class, Cityscapes by default.
      max_examples: at most this many rows (summaries need only a few).

    Every panel is resized (nearest) to the input's size, so label-resolution maps fit.
    The result is what clu's `writer.write_images` takes: a batch of HWC images.
    """
    rows = []
    for n in range(min(len(image), max_examples)):
        panels = [denormalize_image(image[n], mean_bgr)]
        if reconstruction is not None:
            panels.append(unit_image_to_rgb(reconstruction[n]))
        panels.append(colorize(prediction[n], colors))
        if label is not None:
            panels.append(colorize(label[n], colors))
        rows.append(image_row(panels))
    return np.stack(rows)
