"""Synthetic captions: paraphrases generated from a `Scene`, so each is true of its image by construction.

`make_captions` draws distinct templates; every caption names the main group's colour and shape, and
mentions secondary details (size, place, background, a second group) only sometimes. Shared template
words keep the task from being a lookup.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from itsim.data.synth.scene import BACKGROUNDS, Group, Scene

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "ring": "rings", "cross": "crosses"}
ROW_NAMES = ("top", "", "bottom")
COL_NAMES = ("left", "", "right")


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
