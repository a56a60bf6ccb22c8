"""Procedural street scenes: the embedded two-domain benchmark, in numpy only.

A scene is drawn in two steps that are deliberately separate:
1. `sample_layout`: the label map (19 Cityscapes trainIds) and an instance map. The layout is the
   same *distribution* in both domains: sky above a horizon, buildings and trees standing on it, a
   road in perspective with sidewalks and terrain beside it, and poles with signs and lights, cars,
   buses, people and riders standing on the ground, smaller the farther away they are.
2. `render_appearance`: turns a layout into an RGB image under an `Appearance` (palette, colour
   jitter, texture, lighting, noise, blur). The source appearance is flat and clean like a game;
   the target one has other colours, uneven lighting, texture, sensor noise and blur, like a
   photograph. Only appearance differs between the domains, so a model that has learned
   layout/shape cues can transfer, and one that learned colours cannot: a real domain gap.

Everything is deterministic given the numpy Generator passed in.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lsd_jax.data.classes import NUM_CLASSES

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)

# Base RGB colour of each trainId per palette. "game": saturated and distinct, like a renderer's
# materials. "photo": the muted greys/greens/browns of real streets; several classes that are
# well separated in "game" are close here (road/sidewalk/building/wall), as in photographs.
PALETTES = {
    "game": np.array([
        (90, 80, 110), (200, 150, 190), (150, 90, 60), (120, 120, 200), (200, 180, 120),
        (230, 230, 230), (255, 140, 0), (255, 230, 0), (40, 170, 40), (140, 220, 90),
        (110, 170, 255), (230, 40, 60), (255, 60, 200), (20, 40, 220), (40, 90, 110),
        (20, 140, 160), (120, 60, 160), (255, 90, 90), (160, 30, 60),
    ], dtype=np.float32),
    "photo": np.array([
        (105, 105, 100), (150, 145, 135), (125, 115, 105), (140, 135, 125), (130, 120, 95),
        (85, 85, 80), (60, 60, 45), (170, 160, 70), (75, 95, 50), (120, 125, 75),
        (185, 200, 215), (85, 60, 55), (110, 60, 60), (70, 75, 95), (90, 100, 105),
        (150, 130, 70), (120, 115, 110), (60, 50, 55), (55, 45, 40),
    ], dtype=np.float32),
}


@dataclasses.dataclass(frozen=True)
class Appearance:
    """How a layout is painted. All fields are plain numbers so that builder configs carry them.

    palette: key of PALETTES (base colour per class).
    color_jitter: std of a per-instance colour offset, 0-255 units (cars differ in colour).
    texture: amplitude of multi-scale multiplicative noise inside regions (0 = flat).
    lighting: strength of a random brightness gradient, vignette and colour cast per image.
    noise: std of per-pixel Gaussian sensor noise, 0-255 units.
    blur: sigma in pixels of a Gaussian blur of the whole image (0 = sharp).
    gamma: tone curve exponent applied last (1 = linear).
    """
    palette: str = "game"
    color_jitter: float = 12.0
    texture: float = 0.0
    lighting: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    gamma: float = 1.0

    def __post_init__(self):
        if self.palette not in PALETTES:
            raise ValueError(f"unknown palette {self.palette!r}; expected one of {sorted(PALETTES)}")
        for name in ("color_jitter", "texture", "lighting", "noise", "blur"):
            if getattr(self, name) < 0:
                raise ValueError(f"Appearance.{name} must be >= 0, got {getattr(self, name)}")
        if self.gamma <= 0:
            raise ValueError(f"Appearance.gamma must be > 0, got {self.gamma}")


SOURCE_APPEARANCE = Appearance(palette="game", color_jitter=12.0)
TARGET_APPEARANCE = Appearance(palette="photo", color_jitter=18.0, texture=0.25, lighting=0.5,
                               noise=8.0, blur=0.8, gamma=1.15)


class _Canvas:
    """Label and instance maps drawn with the painter's algorithm (later shapes occlude)."""

    def __init__(self, height: int, width: int):
        self.label = np.full((height, width), SKY, dtype=np.uint8)
        self.instance = np.zeros((height, width), dtype=np.int32)
        self.next_instance = 1
        self.yy, self.xx = np.mgrid[0:height, 0:width]

    def paint(self, mask: np.ndarray, cls: int, new_instance: bool = True) -> None:
        self.label[mask] = cls
        self.instance[mask] = self.next_instance
        if new_instance:
            self.next_instance += 1

    def box(self, top, bottom, left, right, cls, new_instance=True):
        h, w = self.label.shape
        t, b = int(max(0, round(top))), int(min(h, round(bottom)))
        l, r = int(max(0, round(left))), int(min(w, round(right)))
        if b > t and r > l:
            mask = np.zeros((h, w), dtype=bool)
            mask[t:b, l:r] = True
            self.paint(mask, cls, new_instance)

    def ellipse(self, cy, cx, ry, rx, cls, new_instance=True):
        mask = ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 <= 1
        self.paint(mask, cls, new_instance)


def _road_edges(y, horizon, vanish_x, bottom_left, bottom_right, height):
    """x of the left and right road edge at row y (lines from the vanishing point)."""
    t = (y - horizon) / max(height - horizon, 1)
    return vanish_x + t * (bottom_left - vanish_x), vanish_x + t * (bottom_right - vanish_x)


def sample_layout(rng: np.random.Generator, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A random street scene: (label (H, W) uint8 trainIds, instance (H, W) int32)."""
    c = _Canvas(height, width)
    horizon = height * rng.uniform(0.38, 0.5)

    # Skyline: buildings of varied widths and heights, trees and sky gaps between them.
    x = -rng.uniform(0, 0.1) * width
    while x < width:
        w = width * rng.uniform(0.07, 0.22)
        kind = rng.uniform()
        if kind < 0.7:
            c.box(horizon - height * rng.uniform(0.12, 0.4), horizon + 1, x, x + w, BUILDING)
        elif kind < 0.85:
            c.ellipse(horizon - height * 0.1, x + w / 2, height * rng.uniform(0.08, 0.16), w / 2,
                      VEGETATION)
        x += w

    # Ground: terrain everywhere below the horizon, then sidewalks and road in perspective.
    ground = c.yy >= horizon
    c.paint(ground, TERRAIN)
    vanish_x = width * rng.uniform(0.4, 0.6)
    bottom_left, bottom_right = width * rng.uniform(-0.15, 0.2), width * rng.uniform(0.8, 1.15)
    walk = width * rng.uniform(0.12, 0.3)
    left, right = _road_edges(c.yy, horizon, vanish_x, bottom_left, bottom_right, height)
    outer_l, outer_r = _road_edges(c.yy, horizon, vanish_x, bottom_left - walk,
                                   bottom_right + walk, height)
    c.paint(ground & (c.xx >= outer_l) & (c.xx <= outer_r), SIDEWALK)
    c.paint(ground & (c.xx >= left) & (c.xx <= right), ROAD)

    # A wall or fence segment along the skyline.
    if rng.uniform() < 0.7:
        l = width * rng.uniform(0, 0.7)
        c.box(horizon - height * rng.uniform(0.07, 0.14), horizon + 1, l,
              l + width * rng.uniform(0.15, 0.35), WALL if rng.uniform() < 0.5 else FENCE)

    # Things standing on the ground, drawn far to near so that near ones occlude.
    things = []
    for _ in range(rng.integers(2, 6)):
        things.append(("pole", rng.uniform(horizon + 2, height)))
    for _ in range(rng.integers(1, 5)):
        things.append(("vehicle", rng.uniform(horizon + 4, height * 1.05)))
    for _ in range(rng.integers(1, 5)):
        things.append(("person", rng.uniform(horizon + 2, height)))
    for _ in range(rng.integers(0, 3)):
        things.append(("tree", rng.uniform(horizon + 2, height * 0.9)))
    things.sort(key=lambda t: t[1])
    for kind, base in things:
        scale = (base - horizon) / (height - horizon)  # 0 at the horizon, 1 at the bottom
        l_edge, r_edge = _road_edges(base, horizon, vanish_x, bottom_left, bottom_right, height)
        ol_edge, or_edge = _road_edges(base, horizon, vanish_x, bottom_left - walk,
                                       bottom_right + walk, height)
        on_left = rng.uniform() < 0.5
        side_x = rng.uniform(ol_edge, l_edge) if on_left else rng.uniform(r_edge, or_edge)
        if kind == "pole":
            _draw_pole(c, rng, base, side_x, scale, height, width)
        elif kind == "person":
            _draw_person(c, rng, base, side_x, scale, height, width)
        elif kind == "tree":
            tree_x = (rng.uniform(ol_edge - walk * scale, ol_edge) if on_left
                      else rng.uniform(or_edge, or_edge + walk * scale))
            _draw_tree(c, rng, base, tree_x, scale, height, width)
        else:
            _draw_vehicle(c, rng, base, rng.uniform(l_edge, r_edge), scale, height, width)
    return c.label, c.instance


def _draw_pole(c, rng, base, x, scale, height, width):
    # Thick enough to survive F's stride-8 output even far away (at least 3 px and 6 px):
    # the reference's resolution is about 4x ours, where thin poles and signs still show.
    pole_h = height * (0.2 + 0.6 * scale)
    pole_w = max(3.0, width * 0.016 * (0.3 + scale))
    top = base - pole_h
    c.box(top, base, x - pole_w / 2, x + pole_w / 2, POLE)
    head = max(6.0, width * 0.05 * (0.3 + scale))
    if rng.uniform() < 0.5:
        c.box(top, top + head, x - head / 2, x + head / 2, SIGN)
    else:
        c.box(top, top + 2.2 * head, x - head / 3, x + head / 3, LIGHT)


def _draw_person(c, rng, base, x, scale, height, width):
    h = height * (0.12 + 0.4 * scale)
    w = max(3.0, h * 0.32)
    if rng.uniform() < 0.25:  # a rider on a bicycle
        c.ellipse(base - h * 0.2, x, h * 0.2, w * 1.4, BICYCLE)
        c.ellipse(base - h * 0.65, x, h * 0.35, w / 2, RIDER)
        c.ellipse(base - h * 1.05, x, w * 0.4, w * 0.4, RIDER, new_instance=False)
        return
    c.ellipse(base - h * 0.45, x, h * 0.45, w / 2, PERSON, new_instance=False)
    c.ellipse(base - h * 0.95, x, w * 0.35, w * 0.35, PERSON)


def _draw_tree(c, rng, base, x, scale, height, width):
    h = height * (0.2 + 0.5 * scale)
    trunk = max(2.0, width * 0.01 * (0.3 + scale))
    c.box(base - h * 0.5, base, x - trunk / 2, x + trunk / 2, VEGETATION, new_instance=False)
    c.ellipse(base - h * 0.7, x, h * 0.3, h * rng.uniform(0.2, 0.35), VEGETATION)


def _draw_vehicle(c, rng, base, x, scale, height, width):
    kind = rng.uniform()
    cls, w_frac, h_frac = ((CAR, 0.22, 0.12) if kind < 0.75 else
                           (BUS, 0.3, 0.25) if kind < 0.88 else (TRUCK, 0.28, 0.22))
    w = width * w_frac * (0.1 + scale)
    h = height * h_frac * (0.1 + scale) * 1.6
    c.box(base - h, base - h * 0.15, x - w / 2, x + w / 2, cls, new_instance=False)
    if cls == CAR:  # a narrower cabin on top
        c.box(base - h * 1.45, base - h + 1, x - w * 0.3, x + w * 0.3, cls, new_instance=False)
    wheel = max(1.0, h * 0.18)
    for wx in (x - w * 0.3, x + w * 0.3):
        c.ellipse(base - wheel, wx, wheel, wheel, cls, new_instance=False)
    c.next_instance += 1


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise in [-1, 1]: a random grid of `cell`-pixel spacing, bilinearly interpolated."""
    gh, gw = int(np.ceil(height / cell)) + 2, int(np.ceil(width / cell)) + 2
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    y = np.arange(height, dtype=np.float32) / cell
    x = np.arange(width, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx)
            + g11 * fy * fx)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image with edge padding."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        n = image.shape[axis]
        image = sum(t * np.take(padded, np.arange(i, i + n), axis=axis)
                    for i, t in enumerate(taps))
    return image


def render_appearance(rng: np.random.Generator, label: np.ndarray, instance: np.ndarray,
                      appearance: Appearance) -> np.ndarray:
    """Paint a layout: (H, W) label + instance maps -> (H, W, 3) uint8 RGB image."""
    height, width = label.shape
    palette = PALETTES[appearance.palette]
    image = palette[label].copy()

    # Per-instance colour: each car, building, person has its own shade.
    offsets = rng.normal(0, appearance.color_jitter, size=(instance.max() + 1, 3))
    image += offsets[instance].astype(np.float32)

    if appearance.texture > 0:
        # Multi-scale multiplicative texture (asphalt grain, foliage, facades).
        tex = (0.5 * smooth_noise(rng, height, width, 16) + 0.3 * smooth_noise(rng, height, width, 4)
               + 0.2 * rng.uniform(-1, 1, size=(height, width)))
        image *= (1 + appearance.texture * tex)[..., None]
        # Windows on buildings: a regular grid of darker cells.
        windows = ((np.arange(height)[:, None] // 3) % 3 == 0) & ((np.arange(width) // 3) % 3 == 0)
        image[(label == BUILDING) & windows] *= 1 - 0.5 * appearance.texture

    if appearance.lighting > 0:
        # Uneven light: a random linear brightness gradient, a vignette and a colour cast.
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5))
        vignette = ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2)
        gain = 1 + appearance.lighting * (0.8 * ramp - 0.8 * vignette + rng.uniform(-0.3, 0.2))
        cast = 1 + appearance.lighting * rng.uniform(-0.15, 0.15, size=3)
        image *= gain[..., None] * cast.astype(np.float32)

    image = gaussian_blur(image, appearance.blur)
    if appearance.noise > 0:
        image += rng.normal(0, appearance.noise, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255)
    if appearance.gamma != 1:
        image = 255 * (image / 255) ** appearance.gamma
    return np.round(image).astype(np.uint8)


def render_scene(seed: tuple[int, ...] | int, height: int, width: int,
                 appearance: Appearance) -> tuple[np.ndarray, np.ndarray]:
    """One deterministic scene: (image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds).

    `seed` picks the layout and the appearance noise; the same seed gives the same pixels.
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size {height}x{width} is too small; use at least 16x16")
    layout_rng, paint_rng = [np.random.default_rng(s) for s in
                             np.random.SeedSequence(seed).spawn(2)]
    label, instance = sample_layout(layout_rng, height, width)
    return render_appearance(paint_rng, label, instance, appearance), label
