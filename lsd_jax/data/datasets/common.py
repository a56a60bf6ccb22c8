"""What the real-dataset builders share: the stored features, file checks and the build report.

Every builder stores the same three features, so the input pipeline reads them all alike:
  image: the RGB image (PNG or JPEG bytes; the original file's bytes when not resized)
  label: (H, W, 1) uint8 PNG of trainIds of the builder's class set, 255 = ignore
  name:  the file stem, e.g. "00042" or "aachen_000000_000019"
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from typing import Iterable

import numpy as np
from absl import logging
from PIL import Image

import tensorflow_datasets as tfds


class LayoutError(ValueError):
    """The manual directory is missing, empty or not laid out as the builder expects."""


class BadFileError(ValueError):
    """A file in the manual directory cannot be used (unreadable, truncated, wrong size)."""


def segmentation_features(image_shape=(None, None, 3), label_shape=(None, None, 1),
                          image_format: str = "png") -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=image_shape, encoding_format=image_format),
        "label": tfds.features.Image(shape=label_shape, encoding_format="png"),
        "name": tfds.features.Text(),
    })


def require_dirs(dl_manager, subdirs: Iterable[str], layout: str, dataset: str):
    """The manual directory as a Path after checking every subdir exists, or raise with the
    layout expected."""
    try:
        root = dl_manager.manual_dir
    except (AssertionError, ValueError) as e:  # TFDS: missing or empty manual directory
        raise LayoutError(f"{dataset}: {e}\nExpected layout:\n{layout}") from e
    if root is None:
        raise LayoutError(f"{dataset}: no manual directory given. Pass --manual_dir (tfds build) "
                          f"or DownloadConfig(manual_dir=...), pointing at:\n{layout}")
    root = tfds.core.Path(root)
    missing = [d for d in subdirs if not (root / d).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "(does not exist)"
        raise LayoutError(f"{dataset}: manual directory {root} lacks {missing}; it holds {found}. "
                          f"Expected layout:\n{layout}")
    return root


def list_pngs(directory, suffix: str = ".png") -> dict[str, object]:
    """{stem without suffix: path} for every file in `directory` ending in `suffix`."""
    return {p.name[:-len(suffix)]: p for p in sorted(directory.iterdir())
            if p.name.endswith(suffix)}


@dataclasses.dataclass
class BuildReport:
    """Pairs left out of a build and label ids outside the known set, for the log and info.

    Whatever is collected here is logged, appended to the dataset's description and stored in
    its metadata (metadata.json beside the data: `builder.info.metadata`).
    """
    dataset: str
    left_out: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    unknown_id_pixels: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    files_with_unknown_ids: list[str] = dataclasses.field(default_factory=list)

    def leave_out(self, name: str, reason: str) -> None:
        logging.warning("%s: leaving out %s: %s", self.dataset, name, reason)
        self.left_out[reason].append(name)

    def count_unknown(self, name: str, ids: np.ndarray, known: np.ndarray) -> None:
        """Count pixels whose id is not in `known` (a boolean table indexed by id)."""
        unknown = ~known[ids]
        if unknown.any():
            values, counts = np.unique(ids[unknown], return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                self.unknown_id_pixels[int(v)] += int(c)
            self.files_with_unknown_ids.append(name)

    def as_metadata(self) -> dict:
        return {
            "left_out": {reason: sorted(names) for reason, names in self.left_out.items()},
            "num_left_out": sum(len(v) for v in self.left_out.values()),
            "unknown_label_ids": {str(k): v for k, v in sorted(self.unknown_id_pixels.items())},
            "files_with_unknown_label_ids": sorted(self.files_with_unknown_ids),
        }

    def summary(self) -> str:
        lines = []
        for reason, names in sorted(self.left_out.items()):
            shown = ", ".join(sorted(names)[:50]) + (" ..." if len(names) > 50 else "")
            lines.append(f"Left out {len(names)} pair(s) ({reason}): {shown}")
        if self.unknown_id_pixels:
            lines.append(
                f"{len(self.files_with_unknown_ids)} label file(s) hold ids outside the known "
                f"set, mapped to 255 (pixels per id): {dict(sorted(self.unknown_id_pixels.items()))}")
        return "\n".join(lines) or "Nothing left out; every label id was known."

    @classmethod
    def from_metadata(cls, dataset: str, meta: dict) -> "BuildReport":
        report = cls(dataset)
        for reason, names in meta.get("left_out", {}).items():
            report.left_out[reason].extend(names)
        report.unknown_id_pixels.update(
            {int(k): v for k, v in meta.get("unknown_label_ids", {}).items()})
        report.files_with_unknown_ids.extend(meta.get("files_with_unknown_label_ids", []))
        return report

    def publish(self, info) -> None:
        """Log the report and write it into the dataset info (description and metadata)."""
        text = self.summary()
        logging.info("%s build report:\n%s", self.dataset, text)
        proto = info.as_proto
        proto.description = with_report(proto.description, text)
        if info.metadata is not None:
            info.metadata.update(self.as_metadata())


REPORT_MARKER = "\n\nBuild report:\n"


def with_report(description: str, report_text: str) -> str:
    return description.split(REPORT_MARKER)[0] + REPORT_MARKER + report_text


def describe(builder, description: str) -> str:
    """The description, with the build report of an already built dataset appended (TFDS
    takes descriptions from the code, so the report is re-read from metadata.json)."""
    path = tfds.core.Path(builder.data_dir) / "metadata.json"
    try:
        if path.exists():
            report = BuildReport.from_metadata(builder.name, json.loads(path.read_text()))
            return with_report(description, report.summary())
    except (OSError, ValueError):  # an unreadable report must not stop reading the data
        pass
    return description


def open_image(path, what: str) -> Image.Image:
    """Fully decode an image with PIL, or raise BadFileError naming the file."""
    try:
        with tfds.core.Path(path).open("rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            image.load()  # PIL decodes lazily: force it so truncated files fail here
        return image
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise BadFileError(f"{what} {os.fspath(path)} cannot be decoded: {e}") from e


def image_size(path, what: str) -> tuple[int, int]:
    """(width, height) from the header only; cheap enough to check every pair before building."""
    try:
        with Image.open(os.fspath(path)) as image:
            return image.size
    except Exception as e:
        raise BadFileError(f"{what} {os.fspath(path)} cannot be read: {e}") from e


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def label_png(train_ids: np.ndarray) -> bytes:
    """(H, W) uint8 trainIds -> PNG bytes of shape (H, W, 1) as the `label` feature stores."""
    return encode_png(np.ascontiguousarray(train_ids, dtype=np.uint8))


def missing_partner_message(dataset: str, kind: str, names: list[str], expected: str) -> str:
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    return (f"{dataset}: {len(names)} {kind} without a partner file ({expected}): {shown}. "
            "Complete the copy, or build with skip_bad_files=True "
            "(python -m lsd_jax.data.prepare ... --skip_bad_files) to leave them out; they are "
            "then listed in the build report.")


def resize_pair(image: Image.Image, ids: np.ndarray, size) -> tuple[Image.Image, np.ndarray]:
    """Resize an image (bilinear, antialiased) and its id map (nearest) to size = (H, W)."""
    height, width = size
    image = image.convert("RGB").resize((width, height), Image.BILINEAR)
    ids = np.asarray(Image.fromarray(ids).resize((width, height), Image.NEAREST))
    return image, ids


def generate_pairs(pairs, *, read_ids, id_table: np.ndarray, known_ids: np.ndarray,
                   resize, image_format: str, skip_bad_files: bool, report: BuildReport):
    """Yield (name, example) for each (name, image_path, label_path) pair.

    read_ids(label_path) -> integer id map (H, W). Labels are mapped id -> trainId here, once,
    so that training reads trainIds directly. Images are stored as their original bytes unless
    `resize` (H, W) is set, in which case the resized copy is encoded as `image_format`.
    """
    for name, image_path, label_path in pairs:
        try:
            image = open_image(image_path, "image")
            ids = read_ids(label_path)
        except BadFileError as e:
            if not skip_bad_files:
                raise BadFileError(f"{e}. Build with skip_bad_files=True to leave such pairs "
                                   "out (they are listed in the build report).") from e
            report.leave_out(name, "unreadable or truncated file")
            continue
        if (ids.shape[1], ids.shape[0]) != image.size:
            report.leave_out(name, "image and label sizes differ")
            continue
        report.count_unknown(name, ids, known_ids)
        if resize is not None:
            image, ids = resize_pair(image, ids.astype(np.int32), resize)
            image_bytes = encode_image(image, image_format)
        else:
            image_bytes = tfds.core.Path(image_path).read_bytes()
        yield name, {"image": image_bytes, "label": label_png(id_table[ids]), "name": name}
