"""Synthetic scenes: a random description (shapes, colours, places, background) and its pixels.

The main attributes (the main object's colour and shape, the background colour) are large and
distinct enough to survive a 64 px stretch resize, which is what lets the demo's small matcher learn
them in minutes on a CPU; secondary details, jitter, texture noise and unmentioned distractors keep
the task from being a lookup. The captions describe the `Scene` (`synth_captions`), never the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS = {"red": (215, 30, 30), "orange": (250, 135, 10), "yellow": (250, 225, 35), "green": (30, 165, 50),
           "blue": (35, 70, 225), "purple": (140, 40, 180), "white": (250, 250, 250), "black": (15, 15, 15)}
# Background: base colour, the object colours too close to it to be told apart, caption wordings.
BACKGROUNDS = {
    "sky": ((150, 200, 240), {"blue", "white"}, ("light blue", "sky blue", "pale blue")),
    "grass": ((110, 175, 80), {"green", "yellow"}, ("grass green", "grassy", "green")),
    "sand": ((225, 205, 160), {"yellow", "white", "orange"}, ("sandy", "beige", "sand coloured")),
    "grey": ((128, 128, 128), set(), ("grey", "gray")),
    "night": ((25, 25, 55), {"black", "blue", "purple"}, ("dark", "navy", "night")),
    "pink": ((240, 175, 200), {"white", "red"}, ("pink", "light pink")),
}
TEXTURES = ("plain", "striped", "gradient")
DISTRACTOR_RGB = ((125, 80, 40), (90, 90, 90), (170, 160, 140))


@dataclass(frozen=True)
class Item:
    """One drawn shape, in pixels."""
    shape: str
    rgb: tuple[int, int, int]
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Group:
    """What a caption names: `count` identical shapes at one grid position (row, col in 0..2)."""
    shape: str
    colour: str
    size: str  # "small" | "large"
    count: int
    row: int
    col: int
    layout: str  # "single" | "row" | "column"
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    texture: str
    bg_rgb: tuple[int, int, int]
    texture_angle: float
    texture_period: float
    noise: int
    main: Group
    secondary: Group | None
    relation: str | None  # where the main group is relative to the secondary one
    distractor: Item | None


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _overlaps(item: Item, others: list[Item], gap: float) -> bool:
    return any(math.hypot(item.x - o.x, item.y - o.y) < item.radius + o.radius + gap for o in others)


def _place_group(rng: np.random.Generator, w: int, h: int, shape: str, colour: str, size: str, count: int,
                 placed: list[Item]) -> Group | None:
    """Lay out a group on the 3x3 grid, clamped inside the image; None when it would overlap `placed`."""
    short = min(w, h)
    # Diameter as a fraction of the short side: the main group always outweighs a secondary one.
    frac = {"large": (0.40, 0.52), "small": (0.24, 0.30), "group": (0.22, 0.27), "minor": (0.16, 0.21)}[
        "group" if count > 1 else size]
    frac = rng.uniform(*frac)
    size = "small" if size == "minor" else size
    radius = frac * short / 2
    grid = (0.2, 0.5, 0.8)
    row, col = int(rng.integers(3)), int(rng.integers(3))
    if count == 1:
        layout, spots = "single", [(grid[col], grid[row])]
    elif rng.random() < 0.5 or w >= h * 1.3:
        layout, col = "row", 1
        spots = [((i + 0.5) / count, grid[row]) for i in range(count)]
    else:
        layout, row = "column", 1
        spots = [(grid[col], (i + 0.5) / count) for i in range(count)]
    base_rgb = COLOURS[colour]
    items = []
    margin = radius + 0.03 * short
    for fx, fy in spots:
        x = float(np.clip(fx * w + rng.normal(0, 0.025 * w), margin, w - margin))
        y = float(np.clip(fy * h + rng.normal(0, 0.025 * h), margin, h - margin))
        item = Item(shape, _jitter_rgb(rng, base_rgb, 12), x, y, radius * rng.uniform(0.93, 1.07),
                    float(rng.uniform(-15, 15)))
        if _overlaps(item, placed + items, 0.02 * short):
            return None
        items.append(item)
    return Group(shape, colour, size, count, row, col, layout, tuple(items))


def _relation(main: Group, other: Group) -> str:
    mx, my = np.mean([i.x for i in main.items]), np.mean([i.y for i in main.items])
    ox, oy = np.mean([i.x for i in other.items]), np.mean([i.y for i in other.items])
    if abs(mx - ox) >= abs(my - oy):
        return "to the left of" if mx < ox else "to the right of"
    return "above" if my < oy else "below"


def make_scene(rng: np.random.Generator, min_size: int = 320, max_size: int = 640) -> Scene:
    """A random scene: every choice is drawn from `rng`, so the same generator state gives the same scene."""
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    background = str(rng.choice(list(BACKGROUNDS)))
    bg_rgb, excluded, _ = BACKGROUNDS[background]
    allowed = [c for c in COLOURS if c not in excluded]
    colour = str(rng.choice(allowed))
    shape = str(rng.choice(SHAPES))
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    size = "large" if count == 1 and rng.random() < 0.65 else "small"
    main = None
    while main is None:  # an empty canvas always fits one group; retries only re-jitter
        main = _place_group(rng, w, h, shape, colour, size, count, [])
    secondary = relation = None
    if rng.random() < 0.5:
        sec_colour = str(rng.choice([c for c in allowed if c != colour]))
        sec_shape = str(rng.choice([s for s in SHAPES if s != shape]))
        for _ in range(20):
            secondary = _place_group(rng, w, h, sec_shape, sec_colour, "minor", 1, list(main.items))
            if secondary is not None:
                relation = _relation(main, secondary)
                break
    distractor = None
    if rng.random() < 0.3:
        anchor = main.items[0] if rng.random() < 0.5 else None
        x = anchor.x + rng.uniform(-1, 1) * anchor.radius if anchor else rng.uniform(0, w)
        y = anchor.y + rng.uniform(-1, 1) * anchor.radius if anchor else rng.uniform(0, h)
        distractor = Item(str(rng.choice(SHAPES)), DISTRACTOR_RGB[int(rng.integers(len(DISTRACTOR_RGB)))],
                          float(x), float(y), float(rng.uniform(0.03, 0.05) * min(w, h)), float(rng.uniform(0, 360)))
    return Scene(w, h, background, str(rng.choice(TEXTURES)), _jitter_rgb(rng, bg_rgb, 10),
                 float(rng.choice([0.0, 45.0, 90.0, 135.0])), float(rng.uniform(0.09, 0.14) * min(w, h)),
                 int(rng.integers(4, 11)), main, secondary, relation, distractor)


# ---------------------------------------------------------------- drawing

def _background(scene: Scene) -> np.ndarray:
    h, w = scene.height, scene.width
    base = np.array(scene.bg_rgb, dtype=np.float32)
    if scene.texture == "plain":
        return np.broadcast_to(base, (h, w, 3)).copy()
    theta = math.radians(scene.texture_angle)
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    if scene.texture == "striped":
        shade = np.where((proj // (scene.texture_period / 2)) % 2 == 0, 1.0, 0.8).astype(np.float32)
        shade = shade if scene.bg_rgb[0] + scene.bg_rgb[1] > 150 else 2.0 - shade  # lighten dark colours
    else:
        span = float(proj.max() - proj.min()) or 1.0
        shade = 1.08 - 0.3 * (proj - proj.min()) / span  # brighter would pass for white
    return base[None, None, :] * shade[..., None]


def _polygon(item: Item, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Unit-radius points -> rotated, scaled, moved."""
    c, s = math.cos(math.radians(item.angle)), math.sin(math.radians(item.angle))
    r = item.radius
    return [(item.x + r * (px * c - py * s), item.y + r * (px * s + py * c)) for px, py in points]


def _unit_shape(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(0.85 * a, 0.85 * b) for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    if shape == "triangle":
        return [(1.1 * math.cos(math.radians(a)), 0.15 + 1.1 * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        return [((1.05 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                 (1.05 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    if shape == "cross":
        a, b = 1.0, 0.34
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    raise ValueError(shape)


def _draw_item(draw: ImageDraw.ImageDraw, item: Item) -> None:
    if item.shape in ("circle", "ring"):
        box = (item.x - item.radius, item.y - item.radius, item.x + item.radius, item.y + item.radius)
        if item.shape == "circle":
            draw.ellipse(box, fill=item.rgb)
        else:
            draw.ellipse(box, outline=item.rgb, width=max(2, round(0.34 * item.radius)))
        return
    draw.polygon(_polygon(item, _unit_shape(item.shape)), fill=item.rgb)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene's pixels; `rng` only draws the texture noise, so the layout never depends on it."""
    img = Image.fromarray(np.clip(_background(scene), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    groups = [scene.main] + ([scene.secondary] if scene.secondary else [])
    for item in (i for g in groups for i in g.items):
        _draw_item(draw, item)
    if scene.distractor:
        _draw_item(draw, scene.distractor)
    arr = np.asarray(img, dtype=np.int16)
    # Noise at half resolution: cheaper, and blotchier than per-pixel noise, like a texture.
    hh, hw = (scene.height + 1) // 2, (scene.width + 1) // 2
    noise = rng.integers(-scene.noise, scene.noise + 1, size=(hh, hw, 1), dtype=np.int16)
    noise = noise.repeat(2, axis=0).repeat(2, axis=1)[: scene.height, : scene.width]
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
