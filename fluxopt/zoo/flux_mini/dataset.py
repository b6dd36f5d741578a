"""Procedural captioned images for ``flux-mini``: one coloured shape on a plain background.

Every image is drawn from five attributes, all named in its caption:

* colour of the shape (6), shape (3), position on a 3x3 grid (9), size (2), background (3);

with a little jitter of position and size, so no two renders are identical. Rendering is plain
tensor arithmetic (supersampled, so edges are anti-aliased), runs in batches on CPU or GPU and
depends only on the seed. :func:`detect` reads the attributes back from an image with pixel
statistics (background from the border, the shape's mask, its mean colour, fill ratio of its
bounding box, centroid and area): it is how generated images are scored against their captions.

A fixed subset of the 972 attribute combinations (:func:`is_held_out`) is never used for
training, so captions of those combinations are unseen compositions at evaluation time.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

RESOLUTION = 128

COLOURS = {  # name -> RGB in [0, 255]
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (150, 50, 200),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = ("in the top left", "at the top", "in the top right", "on the left", "in the center",
                    "on the right", "in the bottom left", "at the bottom", "in the bottom right")

GRID = (32.0, 64.0, 96.0)  # cell centres (pixels at 128x128)
HALF_EXTENT = {"small": (10.0, 13.0), "large": (20.0, 25.0)}  # half side / radius range
JITTER = 4.0  # pixels either way around the cell centre

CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
          "size": 1 / len(SIZES), "background": 1 / len(BACKGROUNDS)}

TEMPLATES = ("a {size} {colour} {shape} {position} on a {background} background",
             "{background} background, {size} {colour} {shape} {position}")

# Words the T5 tokenizer keeps as single pieces (everything else falls back to characters).
VOCABULARY = sorted({w for words in (COLOURS, BACKGROUNDS, SHAPES, SIZES, POSITION_PHRASES,
                                     ("a", "on", "background", "background,"))
                     for phrase in words for w in phrase.split()})


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    position: str
    size: str
    background: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(size=self.size, colour=self.colour, shape=self.shape,
                                          position=POSITION_PHRASES[POSITIONS.index(self.position)],
                                          background=self.background)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_combinations() -> list[Attributes]:
    return [Attributes(c, s, p, z, b) for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES
            for b in BACKGROUNDS]


def is_held_out(attrs: Attributes, fraction: float = 0.1) -> bool:
    """A fixed ~10% of the combinations, chosen by a hash (not by Python's salted ``hash``)."""
    key = "|".join(attrs.as_dict().values()).encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def held_out_combinations() -> list[Attributes]:
    return [a for a in all_combinations() if is_held_out(a)]


def train_combinations() -> list[Attributes]:
    return [a for a in all_combinations() if not is_held_out(a)]


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]
    attributes: list[Attributes]


def sample_layout(rng: np.random.Generator, combos: list[Attributes], n: int) -> tuple[list[Attributes], np.ndarray]:
    """``n`` attribute sets (uniform over ``combos``) and their continuous layout parameters
    ``(cx, cy, half_extent)`` in pixels at :data:`RESOLUTION`."""
    idx = rng.integers(0, len(combos), size=n)
    attrs = [combos[i] for i in idx]
    u = rng.random((n, 3))
    params = np.empty((n, 3), dtype=np.float64)
    for k, a in enumerate(attrs):
        p = POSITIONS.index(a.position)
        lo, hi = HALF_EXTENT[a.size]
        params[k, 0] = GRID[p % 3] + (2 * u[k, 0] - 1) * JITTER
        params[k, 1] = GRID[p // 3] + (2 * u[k, 1] - 1) * JITTER
        params[k, 2] = lo + u[k, 2] * (hi - lo)
    return attrs, params


def render(attrs: list[Attributes], params: np.ndarray, resolution: int = RESOLUTION,
           device: torch.device | str = "cpu", supersample: int = 2) -> torch.Tensor:
    """Draw the shapes; returns (B, 3, R, R) float32 in [-1, 1]. Circles have radius ``r``,
    squares half side ``r``, triangles point up with half base ``r`` and height ``2 r``
    (all axis-aligned), centred on ``(cx, cy)``."""
    n, s = len(attrs), supersample
    scale = resolution / RESOLUTION
    hi = resolution * s
    coords = (torch.arange(hi, device=device, dtype=torch.float32) + 0.5) / s / scale  # pixel units at 128
    y, x = coords.view(1, hi, 1), coords.view(1, 1, hi)
    p = torch.as_tensor(params, dtype=torch.float32, device=device)
    cx, cy, r = p[:, 0].view(n, 1, 1), p[:, 1].view(n, 1, 1), p[:, 2].view(n, 1, 1)
    kind = torch.tensor([SHAPES.index(a.shape) for a in attrs], device=device).view(n, 1, 1)
    dx, dy = x - cx, y - cy
    circle = dx * dx + dy * dy <= r * r
    square = (dx.abs() <= r) & (dy.abs() <= r)
    # Up-pointing triangle: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
    triangle = (dy <= r) & (dx.abs() * 2 <= (dy + r))
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    mask = torch.nn.functional.avg_pool2d(mask.unsqueeze(1), s).squeeze(1) if s > 1 else mask
    fg = torch.tensor([COLOURS[a.colour] for a in attrs], dtype=torch.float32, device=device) / 127.5 - 1
    bg = torch.tensor([BACKGROUNDS[a.background] for a in attrs], dtype=torch.float32, device=device) / 127.5 - 1
    m = mask.unsqueeze(1)
    return bg.view(n, 3, 1, 1) * (1 - m) + fg.view(n, 3, 1, 1) * m


def make_batch(seed: int, n: int, split: str = "train", device: torch.device | str = "cpu",
               resolution: int = RESOLUTION) -> Batch:
    """A deterministic batch: attributes, layout and caption template depend only on ``seed``."""
    combos = {"train": train_combinations, "held_out": held_out_combinations, "all": all_combinations}[split]()
    rng = np.random.default_rng(seed)
    attrs, params = sample_layout(rng, combos, n)
    templates = rng.integers(0, len(TEMPLATES), size=n)
    images = render(attrs, params, resolution, device)
    return Batch(images, [a.caption(int(t)) for a, t in zip(attrs, templates)], attrs)


def parse_caption(caption: str) -> Attributes:
    """The attributes a caption names (either template)."""
    words = caption.replace(",", " ").split()
    text = " ".join(words)
    colour = next(c for c in COLOURS if c in words)
    shape = next(s for s in SHAPES if s in words)
    size = next(z for z in SIZES if z in words)
    background = next(b for b in BACKGROUNDS if f"{b} background" in text)
    position = next(p for p, phrase in sorted(zip(POSITIONS, POSITION_PHRASES), key=lambda t: -len(t[1]))
                    if phrase in text)
    return Attributes(colour, shape, position, size, background)


# ----------------------------------------------------------------------------- detector


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    ref = np.array([table[k] for k in names], dtype=np.float64)
    return names[int(np.argmin(((ref - rgb) ** 2).sum(1)))]


def detect(image: np.ndarray) -> dict[str, str | float]:
    """Read the attributes of the largest object from an image (H, W, 3), floats in [0, 1] or uint8.

    * background: palette colour nearest the median of the 4-pixel border;
    * object mask: pixels farther than 60 (of 255) in RGB from that background colour;
    * colour: palette colour nearest the median of the mask's pixels (backgrounds excluded);
    * shape: fill ratio of the mask in its bounding box (square ~1.0, circle ~0.79, triangle ~0.5);
    * position: 3x3 grid cell of the mask's bounding-box centre; size: mask area (small <~ 700 px, large >~ 1200 px).
    Returns the five names plus ``fill`` and ``area`` (pixels at 128x128) for diagnostics.
    """
    img = np.asarray(image)
    img = img.astype(np.float64) * (255.0 if img.dtype != np.uint8 and img.max() <= 1.0 + 1e-6 else 1.0)
    h, w, _ = img.shape
    b = max(2, h // 32)
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                             img[:, -b:].reshape(-1, 3)])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg_rgb = np.array(BACKGROUNDS[background], dtype=np.float64)
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > 60.0
    area = float(mask.sum()) * (RESOLUTION / h) * (RESOLUTION / w)
    if mask.sum() < 4:
        return {"colour": "none", "shape": "none", "position": "none", "size": "none", "background": background,
                "fill": 0.0, "area": 0.0}
    ys, xs = np.nonzero(mask)
    colour = _nearest(np.median(img[mask], axis=0), COLOURS)
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / bbox)
    shape = "triangle" if fill < 0.65 else ("circle" if fill < 0.9 else "square")
    col = int(np.clip((xs.min() + xs.max() + 1) / 2 / w * 3, 0, 2))  # bounding-box centre: a
    row = int(np.clip((ys.min() + ys.max() + 1) / 2 / h * 3, 0, 2))  # triangle's centroid is off-centre
    # Smallest small shape: triangle of half base 10 (200 px); largest small: square of 26 px side
    # (676 px); smallest large: triangle of half base 20 (800 px). Area split between them.
    size = "small" if area < 740 else "large"
    return {"colour": colour, "shape": shape, "position": POSITIONS[row * 3 + col], "size": size,
            "background": background, "fill": fill, "area": area}


def score(detected: dict[str, str | float], truth: Attributes) -> dict[str, bool]:
    return {k: detected[k] == v for k, v in truth.as_dict().items()}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
