"""Evaluation: a streaming confusion matrix on device, IoU tables, and their writers
(docs/methods.md, section 6).

The protocol: predict at the training scale, upsample the logits bilinearly to the label
resolution, take the argmax, and add every image into one confusion matrix over the whole set.
IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes whose IoU is defined. Labels 255
(and any label outside [0, num_classes)) are ignored. This is exactly the pixel-level IoU of
the official Cityscapes script (cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling),
which tests/test_evaluate.py checks on the same predictions.

Confusion matrices are indexed [true class, predicted class].

Counting, and why the device matrix is int32. JAX arrays are 32-bit unless `jax_enable_x64` is
on, and 64-bit integers are emulated (slow) on TPU. One int32 cell holds at most 2**31 - 1 =
2,147,483,647 pixels; Cityscapes val (500 images of 2048x1024) is 1,048,576,000 pixels, so even
a single cell holding the whole set fits, but 2,975 train images (6.2e9 pixels) would not.
`evaluate` therefore counts on device in int32 and, before the pixels added since the last
fold could exceed 2**31 - 1 (no cell can hold more pixels than were added), folds the device
matrix into an exact int64 numpy total on the host and starts again from zero. For Cityscapes
val that is one transfer at the very end. Float accumulation is not an option: float32 counts
stop being exact at 2**24 = 16.7M, less than eight full-resolution images.

Importing this module does not import TensorFlow.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255

# The most pixels the int32 device matrix may take between two folds into the int64 total.
DEVICE_COUNT_LIMIT = np.iinfo(np.int32).max

CONFUSION_METHODS = ("scatter", "matmul")

Batch = Mapping[str, Any]
PredictFn = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# On device: upsampling, argmax and counting. All pure and jit-compatible.
# ---------------------------------------------------------------------------------------------

def upsample_logits(logits: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of (N, h, w, C) logits to (N, height, width, C), in float32.

    `jax.image.resize` samples at half-pixel centres and, at the borders, renormalises the
    interpolation weights over the pixels inside the image, which is the same as clamping the
    source coordinate: for upsampling this equals PyTorch's
    `F.interpolate(mode="bilinear", align_corners=False)` and OpenCV's INTER_LINEAR (checked
    against PyTorch in tests/test_evaluate.py). antialias=False keeps that equality for the
    unusual case of a downsampling too (antialias only changes downsampling).
    """
    if logits.ndim != 4:
        raise ValueError(f"logits: expected shape (N, h, w, C), got {tuple(logits.shape)}")
    n, h, w, c = logits.shape
    logits = logits.astype(jnp.float32)
    if (h, w) == (height, width):
        return logits
    return jax.image.resize(logits, (n, height, width, c), method="bilinear", antialias=False)


def predict_labels(logits: jax.Array, height: int, width: int) -> jax.Array:
    """Predicted class map (N, height, width) int32 from (N, h, w, C) logits at any scale."""
    return jnp.argmax(upsample_logits(logits, height, width), axis=-1).astype(jnp.int32)


def batch_confusion(predictions: jax.Array, labels: jax.Array, mask: jax.Array,
                    num_classes: int, method: str = "scatter") -> jax.Array:
    """(num_classes, num_classes) int32 counts of [label, prediction] over one batch.

    Pixels whose label is not in [0, num_classes) (255 = ignore) and every pixel of an example
    with mask False (padding added to fill the last batch) are not counted.

    method "scatter" adds ones into num_classes**2 bins (fast on CPU and GPU); "matmul" contracts
    one-hot int8 maps over the pixels with int32 accumulation (exact, and the better fit for TPUs,
    where scatters with many colliding indices are slow).
    """
    if method not in CONFUSION_METHODS:
        raise ValueError(f"confusion method {method!r} is unknown; expected one of "
                         f"{CONFUSION_METHODS}")
    if predictions.shape != labels.shape or labels.ndim != 3:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels "
                         f"{tuple(labels.shape)} must both be shaped (N, H, W)")
    if mask.shape != labels.shape[:1]:
        raise ValueError(f"mask: expected shape ({labels.shape[0]},) (one flag per example), "
                         f"got {tuple(mask.shape)}")
    labels = labels.astype(jnp.int32)
    predictions = predictions.astype(jnp.int32)
    counted = (labels >= 0) & (labels < num_classes) & mask.astype(bool)[:, None, None]
    # Count per example, then sum over the batch: keeping the batch axis until the final sum
    # lets a batch sharded over a device mesh (also with explicit sharding) count locally on each
    # device and reduce once, instead of scattering sharded indices into one unsharded matrix.
    if method == "matmul":
        # one_hot of an out-of-range index is all zeros, so uncounted pixels vanish here.
        true_one_hot = jax.nn.one_hot(jnp.where(counted, labels, -1), num_classes, dtype=jnp.int8)
        pred_one_hot = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int8)
        per_example = jnp.einsum("nhwt,nhwp->ntp", true_one_hot, pred_one_hot,
                                 preferred_element_type=jnp.int32)
        return per_example.sum(axis=0)
    n = labels.shape[0]
    bins = jnp.where(counted, labels * num_classes + predictions, 0).reshape(n, -1)
    ones = counted.reshape(n, -1).astype(jnp.int32)
    # Zeros shaped (N, C*C) derived from `ones`, so that they carry its batch sharding.
    zeros = jnp.zeros_like(ones[:, :1]) * jnp.zeros((1, num_classes * num_classes), jnp.int32)
    per_example = jax.vmap(lambda z, b, o: z.at[b].add(o))(zeros, bins, ones)
    return per_example.sum(axis=0).reshape(num_classes, num_classes)


@functools.partial(jax.jit, static_argnames=("num_classes", "method"))
def update_confusion(confusion: jax.Array, logits: jax.Array, labels: jax.Array,
                     mask: jax.Array, num_classes: int, method: str = "scatter") -> jax.Array:
    """confusion + the counts of one batch, all on device.

    Args:
      confusion: (num_classes, num_classes) integer matrix [true, predicted]; its dtype is kept.
        With int32, at most DEVICE_COUNT_LIMIT pixels may be added in total (see module doc;
        `evaluate` takes care of that).
      logits: (N, h, w, num_classes) at prediction scale.
      labels: (N, H, W) integer trainIds at full resolution, 255 = ignore.
      mask: (N,) bool, True for real examples, False for padding.
    """
    if logits.shape[-1] != num_classes or confusion.shape != (num_classes, num_classes):
        raise ValueError(f"logits have {logits.shape[-1]} classes and the confusion matrix is "
                         f"{tuple(confusion.shape)}; expected {num_classes} and "
                         f"({num_classes}, {num_classes})")
    predictions = predict_labels(logits, labels.shape[1], labels.shape[2])
    counts = batch_confusion(predictions, labels, mask, num_classes, method)
    return confusion + counts.astype(confusion.dtype)


# predict_labels compiled on its own, for `on_predictions` pictures.
_predict_labels_jit = jax.jit(predict_labels, static_argnums=(1, 2))


def _to_host(array: jax.Array) -> np.ndarray:
    """A replicated device array as numpy, also when it spans several processes."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        if not array.is_fully_replicated:
            raise ValueError("the confusion matrix is sharded across processes; expected it "
                             "replicated (it is a reduction over the whole batch)")
        return np.asarray(array.addressable_data(0))
    return np.asarray(array)


def evaluate(predict_fn: PredictFn, batches: Iterable[Batch], num_classes: int, *,
             method: str = "scatter",
             on_predictions: Callable[[Batch, jax.Array], None] | None = None) -> np.ndarray:
    """Stream batches through `predict_fn` into one (num_classes, num_classes) int64 matrix.

    Args:
      predict_fn: image batch (N, H', W', 3) -> logits (N, h, w, num_classes), e.g.
        `fcn_predict_fn(model, variables)`.
      batches: dicts with "image", "label" (N, H, W; 255 = ignore) and optionally "mask"
        (N,) bool (absent = all examples real). Numpy arrays or global jax.Arrays; in a
        multi-process run every process must iterate the same number of batches, each
        carrying its own "mask" as a global array like the labels.
      num_classes: number of classes of the logits and labels.
      method: how counts are added on device, see `batch_confusion`.
      on_predictions: called as on_predictions(batch, predicted) with the (N, H, W) int32
        predicted class maps at label resolution, e.g. to save pictures of the first batches.

    Returns:
      The exact int64 confusion matrix [true, predicted] over all real examples.
    """
    total = np.zeros((num_classes, num_classes), np.int64)
    on_device = jnp.zeros((num_classes, num_classes), jnp.int32)
    pixels_on_device = 0
    for index, batch in enumerate(batches):
        missing = {"image", "label"} - set(batch)
        if missing:
            raise KeyError(f"batch {index} lacks {sorted(missing)}; it has {sorted(batch)}")
        labels = batch["label"]
        mask = batch.get("mask")
        if mask is None:
            mask = np.ones(labels.shape[:1], bool)
        batch_pixels = math.prod(labels.shape)
        if batch_pixels > DEVICE_COUNT_LIMIT:
            raise ValueError(f"batch {index} has {batch_pixels} label pixels, more than the "
                             f"{DEVICE_COUNT_LIMIT} an int32 count can hold; use smaller batches")
        if pixels_on_device + batch_pixels > DEVICE_COUNT_LIMIT:
            total += _to_host(on_device)
            on_device = jnp.zeros_like(on_device)
            pixels_on_device = 0
        logits = predict_fn(batch["image"])
        on_device = update_confusion(on_device, logits, labels, mask, num_classes, method)
        pixels_on_device += batch_pixels
        if on_predictions is not None:
            on_predictions(batch, _predict_labels_jit(logits, labels.shape[1], labels.shape[2]))
    return total + _to_host(on_device)



def fcn_predict_fn(model, variables) -> PredictFn:
    """predict_fn for `evaluate` from an FCN8s and its {'params', 'frozen'} variables.

    The variables are an argument of the compiled function, not constants baked into it (which
    would copy 134M parameters into the program and recompile for every checkpoint).
    """
    @jax.jit
    def predict(variables, image):
        score, *_ = model.apply(variables, image, train=False)
        return score

    return functools.partial(predict, variables)


# ---------------------------------------------------------------------------------------------
# On the host: IoU from the confusion matrix.
# ---------------------------------------------------------------------------------------------

def _check_confusion(confusion) -> np.ndarray:
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion: expected a square (C, C) matrix, got shape "
                         f"{confusion.shape}")
    if not np.issubdtype(confusion.dtype, np.integer):
        raise ValueError(f"confusion: expected integer counts, got dtype {confusion.dtype}")
    if confusion.size and confusion.min() < 0:
        raise ValueError(f"confusion: counts must be non-negative, found {confusion.min()} "
                         "(an int32 overflow?)")
    return confusion.astype(np.int64)


def per_class_iou(confusion) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN) per class, float64; NaN where TP + FP + FN = 0."""
    confusion = _check_confusion(confusion)
    true_positives = np.diag(confusion)
    union = confusion.sum(axis=1) + confusion.sum(axis=0) - true_positives
    iou = np.full(true_positives.shape, np.nan)
    defined = union > 0
    iou[defined] = true_positives[defined] / union[defined]
    return iou


def mean_iou(iou: np.ndarray, class_indices: Sequence[int] | None = None) -> float:
    """Mean of the defined (non-NaN) IoUs over `class_indices` (all classes if None); NaN if none.

    IoUs stay those of the full matrix: for the SYNTHIA 13-class score of a 16-class model,
    pixels of the three other classes still count as FN and FP of the 13.
    """
    iou = np.asarray(iou, np.float64)
    if class_indices is not None:
        indices = np.asarray(class_indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or
                                                   indices.max() >= len(iou))):
            raise ValueError(f"class indices {list(class_indices)} must be a list of indices "
                             f"in [0, {len(iou)})")
        iou = iou[indices]
    defined = iou[~np.isnan(iou)]
    return float(defined.mean()) if defined.size else float("nan")


def iou_from_confusion(confusion, class_indices: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, float]:
    """(per-class IoU with NaN where undefined, mIoU over the defined classes of the subset)."""
    iou = per_class_iou(confusion)
    return iou, mean_iou(iou, class_indices)


# ---------------------------------------------------------------------------------------------
# Reports: a JSON file and a Markdown table; colourised predictions.
# ---------------------------------------------------------------------------------------------

def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an undefined IoU is written as null."""
    return None if math.isnan(x) else float(x)


def summarize(confusion, class_names: Sequence[str],
              class_subsets: Mapping[str, Sequence[int]] | None = None,
              metadata: Mapping[str, Any] | None = None) -> dict:
    """Everything worth keeping about one evaluation, JSON-ready.

    Args:
      confusion: (C, C) integer matrix [true, predicted].
      class_names: C names, in the order of the label indices.
      class_subsets: extra mIoUs over named lists of class indices, e.g. {"13 classes": [...]}.
      metadata: copied into the result (step, checkpoint, dataset, ...).
    """
    confusion = _check_confusion(confusion)
    if len(class_names) != confusion.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {confusion.shape[0]}-class "
                         "confusion matrix")
    iou, miou = iou_from_confusion(confusion)
    num_pixels = int(confusion.sum())
    return {
        **dict(metadata or {}),
        "num_classes": len(class_names),
        "num_pixels": num_pixels,
        "pixel_accuracy": _finite_or_none(np.trace(confusion) / num_pixels
                                          if num_pixels else float("nan")),
        "per_class_iou": {name: _finite_or_none(v) for name, v in zip(class_names, iou)},
        "miou": _finite_or_none(miou),
        "num_classes_in_miou": int(np.sum(~np.isnan(iou))),
        "subsets": {
            name: {"classes": [class_names[i] for i in indices],
                   "miou": _finite_or_none(mean_iou(iou, indices))}
            for name, indices in (class_subsets or {}).items()
        },
        "confusion": confusion.tolist(),
    }


def format_percent(x: float | None) -> str:
    """A fraction as a percentage with two decimals, or n/a."""
    return "n/a" if x is None else f"{100 * x:.2f}"


def results_markdown(summary: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A per-class IoU table (in %) with the mIoU rows, from a `summarize` result."""
    subsets = summary.get("subsets", {})
    header = ["class", "IoU (%)"] + [f"in {name}" for name in subsets]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|---|---:|" + "---|" * len(subsets)]
    for name, value in summary["per_class_iou"].items():
        marks = ["x" if name in subset["classes"] else "" for subset in subsets.values()]
        lines.append("| " + " | ".join([name, format_percent(value)] + marks) + " |")
    blank = [""] * len(subsets)
    lines.append("| " + " | ".join(
        [f"**mIoU ({summary['num_classes_in_miou']} classes)**",
         f"**{format_percent(summary['miou'])}**"] + blank) + " |")
    for name, subset in subsets.items():
        lines.append("| " + " | ".join(
            [f"**mIoU {name}**", f"**{format_percent(subset['miou'])}**"] + blank) + " |")
    lines += ["", f"{summary['num_pixels']} labelled pixels, pixel accuracy "
              f"{format_percent(summary['pixel_accuracy'])} %.", ""]
    return "\n".join(lines)


def write_results(directory: str | os.PathLike, summary: Mapping[str, Any],
                  basename: str = "eval", title: str = "Evaluation") -> tuple[str, str]:
    """Write `<basename>.json` and `<basename>.md` into `directory`; returns both paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{basename}.json")
    markdown_path = os.path.join(directory, f"{basename}.md")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
        f.write("\n")
    with open(markdown_path, "w") as f:
        f.write(results_markdown(summary, title))
    return json_path, markdown_path


def write_prediction_pngs(directory: str | os.PathLike, predicted: np.ndarray,
                          names: Sequence[str], colors: np.ndarray | None = None) -> list[str]:
    """Save colourised (N, H, W) class maps as `<name>.png` in `directory`; returns the paths."""
    from PIL import Image  # only needed here

    from lsd_jax import visualize

    predicted = np.asarray(predicted)
    if predicted.ndim != 3 or len(names) != predicted.shape[0]:
        raise ValueError(f"expected (N, H, W) class maps and N names, got shape "
                         f"{predicted.shape} and {len(names)} names")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, label_map in zip(names, predicted):
        path = os.path.join(directory, f"{name}.png")
        Image.fromarray(visualize.colorize(label_map, colors)).save(path)
        paths.append(path)
    return paths
