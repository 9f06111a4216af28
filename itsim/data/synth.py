"""Synthetic captioned images: the embedded default data for the demo and the tests.

Each image is a procedurally drawn scene (coloured shapes on a textured background) and its captions
are paraphrases generated from the same scene description, so a caption is true of its image by
construction. The main attributes (the main object's colour and shape, the background colour) are
large and distinct enough to survive a 64 px stretch resize, which is what lets the demo's small
matcher learn them in minutes on a CPU; secondary details, shared template words, jitter, texture
noise and unmentioned distractors keep the task from being a lookup.

Output is the Flickr30k Kaggle layout (`OUT/results.csv` with `image_name| comment_number| comment`
rows, `OUT/images/*.jpg`), so the synthetic data goes through exactly the reader real data uses.
Every image draws from its own generator seeded by (seed, index): the output is byte-identical for a
seed whatever the worker count.
"""
from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from itsim import config
from itsim.errors import UserError
from itsim.images import encode_jpeg

log = logging.getLogger(__name__)

CSV_HEADER = "image_name| comment_number| comment"
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "ring": "rings", "cross": "crosses"}
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
ROW_NAMES = ("top", "", "bottom")
COL_NAMES = ("left", "", "right")
MAX_CAPTIONS = 10


@dataclass
class SynthConfig:
    out: str = field(default="", metadata={"help": "output folder (results.csv, images/)"})
    images: int = field(default=1000, metadata={"help": "number of images"})
    seed: int = field(default=0, metadata={"help": "same seed, same bytes"})
    min_size: int = field(default=320, metadata={"help": "smallest image side in px"})
    max_size: int = field(default=640, metadata={"help": "largest image side in px"})
    captions_per_image: int = field(default=5, metadata={"help": f"captions per image (1-{MAX_CAPTIONS})"})
    quality: int = field(default=90, metadata={"help": "JPEG quality"})
    workers: int = field(default=1, metadata={"help": "processes; the output does not depend on it"})


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


# ---------------------------------------------------------------- captions

def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(g: Group) -> str:
    return g.shape if g.count == 1 else PLURALS[g.shape]


def _np(g: Group, rng: np.random.Generator, size_p: float = 0.6) -> str:
    """'a large red circle', 'two small red circles', 'one red circle'."""
    size_word = _pick(rng, ("large", "big") if g.size == "large" else ("small", "little"))
    words = ([size_word] if rng.random() < size_p else []) + [g.colour, _noun(g)]
    if g.count == 1:
        det = _pick(rng, ("a", "a", "a", "a", "one", "a single"))
        if det == "a single":
            det, words = "a", ["single", *words]
        if det == "a":
            det = _article(words[0])
    else:
        det = "two" if g.count == 2 else "three"
    return " ".join([det, *words])


def _pos(g: Group, rng: np.random.Generator) -> str:
    row, col = ROW_NAMES[g.row], COL_NAMES[g.col]
    if g.layout == "row":
        where = _pick(rng, ("at the top", "near the top")) if row == "top" else (
            _pick(rng, ("at the bottom", "near the bottom")) if row == "bottom" else "across the middle")
        return _pick(rng, ("in a row ", "side by side ", "")) + where
    if g.layout == "column":
        where = f"on the {col}" if col else "in the centre"
        return _pick(rng, ("stacked ", "in a column ", "")) + where
    if row and col:
        return _pick(rng, (f"at the {row} {col}", f"in the {row} {col} corner"))
    if row:
        return _pick(rng, (f"at the {row}", f"near the {row}"))
    if col:
        return _pick(rng, (f"on the {col}", f"on the {col} side"))
    return _pick(rng, ("in the centre", "in the middle"))


def _bg(s: Scene, rng: np.random.Generator, texture_p: float = 0.5) -> str:
    colour = _pick(rng, BACKGROUNDS[s.background][2])
    noun = _pick(rng, ("background", "background", "backdrop"))
    if s.texture == "plain" or rng.random() >= texture_p:
        phrase = f"plain {colour} {noun}" if s.texture == "plain" and rng.random() < texture_p else f"{colour} {noun}"
    elif s.texture == "striped":
        phrase = _pick(rng, (f"striped {colour} {noun}", f"{colour} {noun} with stripes"))
    else:
        phrase = _pick(rng, (f"{colour} gradient {noun}", f"shaded {colour} {noun}"))
    return f"{_article(phrase)} {phrase}"


def _be(g: Group) -> str:
    return "is" if g.count == 1 else "are"


def _t_on_bg(s: Scene, r: np.random.Generator) -> str:
    return f"{_np(s.main, r)} on {_bg(s, r)}"


def _t_pos(s: Scene, r: np.random.Generator) -> str:
    return f"{_np(s.main, r)} {_pos(s.main, r)}"


def _t_there(s: Scene, r: np.random.Generator) -> str:
    if s.secondary:
        return f"there {_be(s.main)} {_np(s.main, r)} {_pick(r, ('next to', 'beside'))} {_np(s.secondary, r, 0.3)}"
    return f"there {_be(s.main)} {_np(s.main, r)} {_pos(s.main, r)}"


def _t_and(s: Scene, r: np.random.Generator) -> str:
    if s.secondary:
        return f"{_np(s.main, r)} and {_np(s.secondary, r, 0.3)} on {_bg(s, r)}"
    return f"{_np(s.main, r)} {_pos(s.main, r)} of {_bg(s, r)}"


def _t_bg_with(s: Scene, r: np.random.Generator) -> str:
    bg = _bg(s, r, 0.7)
    return f"{bg} {'and' if bg.endswith('stripes') else 'with'} {_np(s.main, r)} {_pos(s.main, r)}"


def _t_relation(s: Scene, r: np.random.Generator) -> str:
    if s.secondary and s.relation:
        return f"{_np(s.main, r)} {s.relation} {_np(s.secondary, r, 0.3)}"
    return f"only {_np(s.main, r)} on {_bg(s, r)}"


def _t_image_of(s: Scene, r: np.random.Generator) -> str:
    lead = _pick(r, ("an image of", "a picture of", "a drawing of", "a picture showing"))
    tail = f" on {_bg(s, r)}" if r.random() < 0.5 else ""
    return f"{lead} {_np(s.main, r)}{tail}"


def _t_short(s: Scene, r: np.random.Generator) -> str:
    return f"{s.main.colour} {_noun(s.main)} {_pos(s.main, r)}"


def _t_attributes(s: Scene, r: np.random.Generator) -> str:
    text = f"the {_noun(s.main)} {_be(s.main)} {s.main.colour} and {s.main.size}"
    return text + (f" against {_bg(s, r)}" if r.random() < 0.4 else "")


def _t_see(s: Scene, r: np.random.Generator) -> str:
    extra = f" and {_np(s.secondary, r, 0.3)}" if s.secondary else ""
    return f"you can see {_np(s.main, r)} {_pos(s.main, r)}{extra}"


TEMPLATES: tuple[Callable[[Scene, np.random.Generator], str], ...] = (
    _t_on_bg, _t_pos, _t_there, _t_and, _t_bg_with, _t_relation, _t_image_of, _t_short, _t_attributes, _t_see)


def make_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` paraphrases from distinct templates; every one names the main group's colour and shape."""
    order = rng.permutation(len(TEMPLATES))
    texts = [TEMPLATES[order[i % len(order)]](scene, rng) for i in range(n)]
    return [t[0].upper() + t[1:] + " ." for t in texts]  # capitalised, " ." as in the Flickr files


# ---------------------------------------------------------------- files

def image_name(index: int) -> str:
    return f"synth_{index:06d}.jpg"


def _rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent scene / pixel-noise / caption streams per image, so each can change alone."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)]


def scene_for(seed: int, index: int, min_size: int = 320, max_size: int = 640) -> Scene:
    """The scene behind image `index` of a run with `seed` (what its captions describe)."""
    return make_scene(_rngs(seed, index)[0], min_size, max_size)


def make_sample(cfg: SynthConfig, index: int) -> tuple[Scene, Image.Image, list[str]]:
    scene_rng, pixel_rng, caption_rng = _rngs(cfg.seed, index)
    scene = make_scene(scene_rng, cfg.min_size, cfg.max_size)
    return scene, render(scene, pixel_rng), make_captions(scene, caption_rng, cfg.captions_per_image)


def _write_range(cfg: SynthConfig, start: int, stop: int) -> list[list[str]]:
    image_dir = Path(cfg.out) / "images"
    captions = []
    for index in range(start, stop):
        _, img, caps = make_sample(cfg, index)
        (image_dir / image_name(index)).write_bytes(encode_jpeg(img, cfg.quality))
        captions.append(caps)
    return captions


def _validate(cfg: SynthConfig) -> None:
    checks = [(bool(cfg.out), "an output folder is required"),
              (cfg.images >= 1, f"--images must be >= 1 (got {cfg.images})"),
              (cfg.seed >= 0, f"--seed must be >= 0 (got {cfg.seed})"),
              (64 <= cfg.min_size <= cfg.max_size <= 4096,
               f"need 64 <= --min-size <= --max-size <= 4096 (got {cfg.min_size}, {cfg.max_size})"),
              (1 <= cfg.captions_per_image <= MAX_CAPTIONS,
               f"--captions-per-image must be in 1..{MAX_CAPTIONS} (got {cfg.captions_per_image})"),
              (1 <= cfg.quality <= 100, f"--quality must be in 1..100 (got {cfg.quality})"),
              (cfg.workers >= 1, f"--workers must be >= 1 (got {cfg.workers})")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise UserError("; ".join(problems))


def run(cfg: SynthConfig, progress: bool = True) -> Path:
    """Write the images, then results.csv (atomically, so a CSV never names a missing image)."""
    _validate(cfg)
    out = Path(cfg.out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out / 'images'}: {exc}") from None
    (out / "results.csv").unlink(missing_ok=True)  # an interrupted rerun must not leave the old CSV behind
    chunk = 50
    ranges = [(s, min(s + chunk, cfg.images)) for s in range(0, cfg.images, chunk)]
    bar = tqdm(total=cfg.images, unit="img", desc="synth", disable=not progress)
    results: list[list[str]] = []
    if cfg.workers == 1:
        for start, stop in ranges:
            results.extend(_write_range(cfg, start, stop))
            bar.update(stop - start)
    else:
        # spawn: safe even when the caller has already imported torch or started threads.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_range, cfg, start, stop) for start, stop in ranges]
            for fut, (start, stop) in zip(futures, ranges):
                results.extend(fut.result())
                bar.update(stop - start)
    bar.close()
    lines = [CSV_HEADER] + [f"{image_name(i)}| {k}| {cap}" for i, caps in enumerate(results) for k, cap in enumerate(caps)]
    csv_path = out / "results.csv"
    tmp = out / "results.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, csv_path)
    (out / "README.txt").write_text(
        f"Synthetic captioned images from `itsim synth` (seed {cfg.seed}): {cfg.images} JPEGs in images/ and "
        f"{cfg.captions_per_image} captions each in results.csv (Flickr30k Kaggle format).\n")
    config.save(cfg, out / "synth_config.yaml")
    stale = sorted(p.name for p in (out / "images").glob("synth_*.jpg")
                   if p.stem[6:].isdigit() and int(p.stem[6:]) >= cfg.images)
    if stale:
        log.warning("%s holds %d images from an earlier, larger run (not in results.csv), e.g. %s",
                    out / "images", len(stale), stale[0])
    return csv_path


def generate(out_dir: str | Path, n_images: int, seed: int, *, min_size: int = 320, max_size: int = 640,
             captions_per_image: int = 5, quality: int = 90, workers: int = 1, progress: bool = False) -> Path:
    """Python entry point: write `n_images` synthetic images and return the path of results.csv.

    `workers > 1` starts spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard (the `itsim` CLI and `python -m` entry points have it).
    """
    cfg = SynthConfig(str(out_dir), n_images, seed, min_size, max_size, captions_per_image, quality, workers)
    return run(cfg, progress=progress)


def _cli(args: argparse.Namespace) -> int:
    cfg = config.from_args(SynthConfig, args)
    _validate(cfg)
    log.info("%s", config.describe(cfg))
    start = time.perf_counter()
    csv_path = run(cfg)
    seconds = time.perf_counter() - start
    print(f"wrote {cfg.images} images and {cfg.images * cfg.captions_per_image} captions to {csv_path} "
          f"in {seconds:.1f} s ({cfg.images / seconds:.0f} images/s)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = config.add_command(
        subparsers, "synth", SynthConfig, _cli, skip=("out",),
        help="write synthetic captioned images (Flickr30k results.csv layout)",
        description="Procedurally drawn shapes with paraphrased captions; byte-identical for a seed.")
    parser.add_argument("out", help="output folder: results.csv, images/, README.txt, synth_config.yaml")
