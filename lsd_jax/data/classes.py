"""Class sets, colours and id -> trainId maps (docs/methods.md, section 5): the one source
of truth.

numpy only, so that models, losses and steps can import it without TensorFlow. Every map is a
dense lookup table (index = raw id, value = trainId, 255 = ignore), which is what both numpy
(`table[ids]`) and tf.data (`tf.gather(table, ids)`, see `lsd_jax.data.pipeline`) want.
"""
from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255

# The 19 Cityscapes train classes, in trainId order.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

# RGB colour of each trainId (the official Cityscapes palette).
CITYSCAPES_COLORS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

# Cityscapes labelIds (also GTA5's palette indices) -> trainIds.
CITYSCAPES_LABELID_TO_TRAINID_PAIRS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# SYNTHIA-RAND-CITYSCAPES class ids (first channel of the 16-bit label PNGs) -> trainIds.
SYNTHIA_ID_TO_TRAINID_PAIRS = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# SYNTHIA protocol: 16 classes for training and evaluation (no terrain, truck, train) and the
# 13-class score (also no wall, fence, pole), as indices into the 19 trainIds.
SYNTHIA_16 = tuple(i for i, name in enumerate(CITYSCAPES_CLASSES)
                   if name not in ("terrain", "truck", "train"))
SYNTHIA_13 = tuple(i for i in SYNTHIA_16
                   if CITYSCAPES_CLASSES[i] not in ("wall", "fence", "pole"))

# Named class sets, used by configs ("which label space do the models predict").
CLASS_SETS = {
    "cityscapes19": tuple(range(NUM_CLASSES)),
    "synthia16": SYNTHIA_16,
}


def dense_table(pairs: dict[int, int], size: int) -> np.ndarray:
    """A lookup table of `size` entries: table[id] = pairs[id], every other id -> 255."""
    table = np.full((size,), IGNORE_LABEL, dtype=np.uint8)
    for raw_id, train_id in pairs.items():
        if not 0 <= raw_id < size:
            raise ValueError(f"id {raw_id} does not fit a lookup table of size {size}")
        table[raw_id] = train_id
    table.setflags(write=False)
    return table


# Length 256: GTA5/Cityscapes ids are uint8. Length 65536: SYNTHIA ids are read from uint16 PNGs.
CITYSCAPES_LABELID_TO_TRAINID = dense_table(CITYSCAPES_LABELID_TO_TRAINID_PAIRS, 256)
SYNTHIA_ID_TO_TRAINID = dense_table(SYNTHIA_ID_TO_TRAINID_PAIRS, 65536)

# Ids that may legitimately appear in a label file (void ones included): anything else is
# reported by the builders as unknown (and mapped to 255 like every void id).
# Cityscapes/GTA5: labelIds 0..33, and 255 (unlabelled in some exports).
CITYSCAPES_KNOWN_IDS = np.zeros((256,), dtype=bool)
CITYSCAPES_KNOWN_IDS[:34] = True
CITYSCAPES_KNOWN_IDS[255] = True
# SYNTHIA-RAND-CITYSCAPES: class ids 0..22 (0 void, 13 lane marking, 14 and 22 unused, ...).
SYNTHIA_KNOWN_IDS = np.zeros((65536,), dtype=bool)
SYNTHIA_KNOWN_IDS[:23] = True
for _table in (CITYSCAPES_KNOWN_IDS, SYNTHIA_KNOWN_IDS):
    _table.setflags(write=False)


def subset_table(subset: tuple[int, ...]) -> np.ndarray:
    """19-class trainIds -> indices into `subset` (classes outside it -> 255); length 256."""
    return dense_table({train_id: i for i, train_id in enumerate(subset)}, 256)


TRAINID19_TO_SYNTHIA16 = subset_table(SYNTHIA_16)
SYNTHIA16_TO_SYNTHIA13 = dense_table(
    {SYNTHIA_16.index(c): i for i, c in enumerate(SYNTHIA_13)}, 256)


def class_set(name: str) -> tuple[int, ...]:
    """The 19-class trainIds that make up the named class set, or a clear error."""
    if name not in CLASS_SETS:
        raise ValueError(f"unknown class set {name!r}; expected one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[name]


def class_names(name: str) -> tuple[str, ...]:
    """Class names of a class set, in the order of its label indices."""
    return tuple(CITYSCAPES_CLASSES[i] for i in class_set(name))


def class_colors(name: str) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours of a class set, in the order of its label indices."""
    return CITYSCAPES_COLORS[list(class_set(name))]


def conversion_table(stored: str, wanted: str) -> np.ndarray:
    """Length-256 table turning labels of class set `stored` into labels of class set `wanted`.

    Classes of `stored` missing from `wanted` become 255 (ignored), e.g. terrain when Cityscapes'
    19 classes are evaluated under the SYNTHIA 16-class protocol.
    """
    stored_ids, wanted_ids = class_set(stored), class_set(wanted)
    return dense_table({i: wanted_ids.index(c) for i, c in enumerate(stored_ids)
                        if c in wanted_ids}, 256)


def map_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply an id -> trainId table to an integer label map, checking the ids fit the table."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
        raise ValueError(f"label ids span [{ids.min()}, {ids.max()}], outside the table's "
                         f"range [0, {len(table) - 1}]")
    return table[ids]


def colorize(label: np.ndarray, class_set_name: str = "cityscapes19") -> np.ndarray:
    """RGB picture of a label map (H, W) -> (H, W, 3) uint8; ignored pixels are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    colors = class_colors(class_set_name)
    palette[:len(colors)] = colors
    return palette[np.asarray(label, dtype=np.int64).clip(0, 255)]
