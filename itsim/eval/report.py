"""`EVAL/report.html`: one self-contained page that shows what a model gets right and wrong.

Numbers alone hide how a matching model fails; the page puts them beside examples: the metrics table
(every key of metrics.json), the plots, for 12 images their top-5 captions and for 12 captions their
top-5 images (true matches marked, with the rank of the first true one), and the most confident
mistakes among the fixed balanced pairs. It opens anywhere, offline and from an e-mail attachment:
images are inline data URIs, the CSS is inline, there is no script and no network reference.

`build_report` takes plain data (dicts, arrays, bytes), so it is tested and reused without a model;
`itsim eval` calls `write_report` with the vectors and score matrix it computed anyway.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from itsim.eval import metrics as metric_fns

THUMBNAIL_PX = 96
HEADLINE = (("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"),
            ("i2t_r1", "image→text R@1"), ("i2t_r5", "image→text R@5"), ("t2i_r1", "text→image R@1"),
            ("t2i_r5", "text→image R@5"))

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0;
       color: #1d2330; background: #f4f5f7; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #d9dde5; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.sub { color: #5b6475; margin: 0 0 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card, .query, .pair, .plots figure { background: #fff; border-radius: 8px; box-shadow: 0 1px 2px #0002; }
.card { padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 22px; } .card span { color: #5b6475; font-size: 12px; }
table.metrics { border-collapse: collapse; background: #fff; font-size: 13px; width: 100%; }
table.metrics tbody { display: grid; grid-auto-flow: column; grid-template-columns: 1fr 1fr; column-gap: 24px; }
table.metrics tr { display: flex; border-bottom: 1px solid #eceef2; }
table.metrics th { flex: 0 0 220px; padding: 3px 12px; text-align: left; font-weight: 500; color: #3b4252; }
table.metrics td { flex: 1; padding: 3px 12px; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
details summary { cursor: pointer; color: #3a5bd9; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots figure { margin: 0; padding: 6px; }
.plots img { max-width: 100%; height: 300px; } figcaption { color: #5b6475; font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 12px; }
.query { padding: 10px; }
.query header { display: flex; gap: 10px; align-items: center; margin-bottom: 6px; }
.query > p { margin: 0 0 6px; }
.thumb { width: 96px; height: 96px; object-fit: contain; background: #e8eaee; border-radius: 4px; flex: none; }
.thumb.small { width: 64px; height: 64px; }
.thumb.tiny { width: 28px; height: 28px; vertical-align: middle; margin-left: 4px; }
.missing { display: inline-flex; align-items: center; justify-content: center; color: #8a92a3; font-size: 11px; }
.name { color: #5b6475; font-size: 12px; overflow-wrap: anywhere; }
ol.results { margin: 0; padding-left: 22px; }
ol.results li { margin: 2px 0; padding: 1px 4px; border-radius: 4px; }
ol.captions li.true { background: #e3f6e8; }
ol.captions li.true::after { content: " ✓ true"; color: #1f8a3b; font-weight: 600; font-size: 12px;
                             white-space: nowrap; }
.score { display: inline-block; min-width: 44px; color: #5b6475; font-variant-numeric: tabular-nums; }
ol.images { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 4px; list-style: none;
            padding: 0; margin: 0; }
ol.images li { text-align: center; border: 3px solid transparent; border-radius: 6px; padding: 1px; margin: 0; }
ol.images .thumb.small { width: 100%; height: auto; aspect-ratio: 1; }
ol.images li.true { border-color: #2fa04e; background: #e3f6e8; }
ol.images li .score { display: block; font-size: 12px; min-width: 0; }
.rank { font-size: 12px; color: #8a5a00; margin: 4px 0 0; }
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(290px, 1fr)); gap: 8px; }
.pair { display: flex; gap: 8px; padding: 8px; }
.pair p { margin: 0 0 4px; } .pair .score { font-weight: 600; color: #b3261e; }
"""


@dataclasses.dataclass
class PairScores:
    """The fixed balanced pairs: image and caption index per pair, label (1 = true pair), probability."""

    image_idx: np.ndarray
    caption_idx: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


def make_thumbnail(image: np.ndarray, size: int = THUMBNAIL_PX, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes no larger than `size` px a side (a few kB; kept for many images)."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(image: bytes | np.ndarray) -> str:
    """A data: URI for PNG/JPEG bytes, or for a uint8 array (encoded as a JPEG thumbnail)."""
    data = make_thumbnail(image) if isinstance(image, np.ndarray) else bytes(image)
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format(value: Any) -> str:
    """Display text of a metrics.json value; the exact value goes in the row's data-value."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _metrics_section(values: Mapping[str, Any]) -> str:
    cards = "".join(f'<div class="card"><b>{_e(_format(values[k]))}</b><span>{_e(label)}</span></div>'
                    for k, label in HEADLINE if k in values)
    rows = "".join(f'<tr data-key="{_e(k)}" data-value="{_e(json.dumps(v))}"><th>{_e(k)}</th>'
                   f"<td>{_e(_format(v))}</td></tr>" for k, v in values.items())
    half = f"grid-template-rows: repeat({(len(values) + 1) // 2}, auto)"  # two columns, read top to bottom
    return (f'<section id="summary"><div class="cards">{cards}</div><details open><summary>every value of '
            f'metrics.json</summary><table class="metrics" id="metrics"><tbody style="{half}">{rows}</tbody>'
            "</table></details></section>")


def _plots_section(plots: Sequence[str | Path]) -> str:
    figures = []
    for path in plots:
        path = Path(path)
        if path.is_file():
            figures.append(f'<figure><img src="{data_uri(path.read_bytes())}" alt="{_e(path.name)}">'
                           f"<figcaption>{_e(path.name)}</figcaption></figure>")
    body = "".join(figures) or '<p class="sub">No plots (matplotlib is not installed, or --no-plots).</p>'
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{body}</div></section>'


class _Thumbs:
    """Each image's <img> (one data URI per image, built once) or a placeholder beyond the kept ones."""

    def __init__(self, thumbnails: Sequence[bytes | np.ndarray], names: Sequence[str]):
        self.thumbnails, self.names, self.uris = thumbnails, names, {}

    def img(self, i: int, css: str = "thumb") -> str:
        name = self.names[i] if i < len(self.names) else f"image {i}"
        if i >= len(self.thumbnails):
            return f'<span class="{css} missing" title="{_e(name)}">no thumbnail</span>'
        if i not in self.uris:
            self.uris[i] = data_uri(self.thumbnails[i])
        return f'<img class="{css}" src="{self.uris[i]}" alt="{_e(name)}" title="{_e(name)}">'

    def name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"image {i}"


def _spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n), first and last included: examples from the whole split."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def _top(row: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-row, kind="stable")[:k]


def _image_queries(scores: np.ndarray, c2i: np.ndarray, captions: Sequence[str], thumbs: _Thumbs,
                   ranks: np.ndarray, examples: int, top_k: int) -> str:
    blocks = []
    for i in _spread(scores.shape[0], examples):
        items = "".join(f'<li class="hit {"true" if c2i[c] == i else "false"}" data-caption="{c}">'
                        f'<span class="score">{scores[i, c]:.3f}</span> {_e(captions[c])}</li>'
                        for c in _top(scores[i], top_k))
        rank = ("" if ranks[i] <= top_k else
                f'<p class="rank">first true caption at rank {ranks[i]} of {scores.shape[1]}</p>')
        blocks.append(f'<div class="query image-query" data-image="{i}"><header>{thumbs.img(i)}'
                      f'<span class="name">{_e(thumbs.name(i))}</span></header>'
                      f'<ol class="results captions">{items}</ol>{rank}</div>')
    return ('<section id="image-to-text"><h2>Image → text: top captions</h2><p class="sub">Each image\'s '
            f"{top_k} best-scored captions among the {scores.shape[1]} of the retrieval set; true captions "
            f'are marked.</p><div class="grid">{"".join(blocks)}</div></section>')


def _caption_queries(scores: np.ndarray, c2i: np.ndarray, captions: Sequence[str], thumbs: _Thumbs,
                     ranks: np.ndarray, examples: int, top_k: int) -> str:
    blocks = []
    for c in _spread(scores.shape[1], examples):
        items = "".join(f'<li class="hit {"true" if c2i[c] == i else "false"}" data-image="{i}">'
                        f'{thumbs.img(int(i), "thumb small")}<span class="score">{scores[i, c]:.3f}</span></li>'
                        for i in _top(scores[:, c], top_k))
        rank = ("" if ranks[c] <= top_k else
                f'<p class="rank">its image is at rank {ranks[c]} of {scores.shape[0]}</p>')
        blocks.append(f'<div class="query caption-query" data-caption="{c}"><p>“{_e(captions[c])}”</p>'
                      f'<ol class="results images">{items}</ol>{rank}</div>')
    return ('<section id="text-to-image"><h2>Text → image: top images</h2><p class="sub">Each caption\'s '
            f"{top_k} best-scored images among the {scores.shape[0]} of the retrieval set; its own image is "
            f'framed in green.</p><div class="grid">{"".join(blocks)}</div></section>')


def _mistakes_section(pairs: PairScores | None, c2i: np.ndarray, captions: Sequence[str], thumbs: _Thumbs,
                      count: int) -> str:
    if pairs is None:
        return ""
    image_idx, caption_idx = np.asarray(pairs.image_idx), np.asarray(pairs.caption_idx)
    labels, probs = np.asarray(pairs.labels).astype(bool), np.asarray(pairs.probs, dtype=np.float64)
    shown = image_idx < len(thumbs.thumbnails)
    false_order = np.flatnonzero(shown & ~labels)
    false_order = false_order[np.argsort(-probs[false_order], kind="stable")][:count]
    true_order = np.flatnonzero(shown & labels)
    true_order = true_order[np.argsort(probs[true_order], kind="stable")][:count]

    def cards(order: np.ndarray, kind: str) -> str:
        out = []
        for p in order:
            i, c = int(image_idx[p]), int(caption_idx[p])
            owner = ("" if kind == "false-negative" else
                     f'<p class="name">the caption belongs to {_e(thumbs.name(int(c2i[c])))}'
                     f'{thumbs.img(int(c2i[c]), "thumb tiny")}</p>')
            score = float(probs[p])
            out.append(f'<div class="pair {kind}" data-image="{i}" data-caption="{c}" data-score="{score!r}">'
                       f'{thumbs.img(i, "thumb small")}<div><p><span class="score">{probs[p]:.3f}</span> '
                       f'“{_e(captions[c])}”</p><p class="name">{_e(thumbs.name(i))}</p>{owner}</div></div>')
        return "".join(out) or '<p class="sub">none</p>'

    scope = ("" if shown.all() else
             f" (among the {int(shown.sum())} of {shown.size} pairs whose image has a thumbnail)")
    return ('<section id="mistakes"><h2>Most confident mistakes</h2><p class="sub">From the fixed balanced pairs '
            f"behind accuracy and ROC-AUC{scope}.</p>"
            '<h3>False pairs scored highest</h3>'
            f'<div class="pairs" id="false-positives">{cards(false_order, "false-positive")}</div>'
            '<h3>True pairs scored lowest</h3>'
            f'<div class="pairs" id="false-negatives">{cards(true_order, "false-negative")}</div>'
            "</section>")


def build_report(metrics: Mapping[str, Any], scores: np.ndarray, caption_to_image: Sequence[int],
                 captions: Sequence[str], thumbnails: Sequence[bytes | np.ndarray], *,
                 image_names: Sequence[str] = (), plots: Sequence[str | Path] = (), pairs: PairScores | None = None,
                 examples: int = 12, top_k: int = 5, mistakes: int = 8, title: str = "itsim evaluation") -> str:
    """The report page as one HTML string.

    `scores[i, c]`: probability of image i with caption c over the retrieval set (the first n_img
    images of the split and their captions, which come first); `captions`/`caption_to_image`: every
    caption of the split and its image index; `thumbnails[i]`: JPEG/PNG bytes or a uint8 array for
    image i (images past the list get a placeholder); `pairs`: the fixed balanced pairs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] > len(captions) or len(captions) != c2i.size:
        raise ValueError(f"scores {scores.shape}, {len(captions)} captions and {c2i.size} caption images disagree")
    if scores.shape[1] and c2i[:scores.shape[1]].max() >= scores.shape[0]:
        raise ValueError("a retrieval caption's image lies outside the score matrix")
    thumbs = _Thumbs(thumbnails, image_names)
    i2t, t2i = metric_fns.retrieval_ranks(scores, c2i[:scores.shape[1]])
    subtitle = " · ".join(f"{k} {_e(metrics[k])}" for k in ("split", "n_images", "n_captions") if k in metrics)
    parts = [f"<h1>{_e(title)}</h1><p class=\"sub\">{subtitle}<br>model {_e(metrics.get('model', ''))}</p>",
             _metrics_section(metrics), _plots_section(plots),
             _image_queries(scores, c2i, captions, thumbs, i2t, examples, top_k),
             _caption_queries(scores, c2i, captions, thumbs, t2i, examples, top_k),
             _mistakes_section(pairs, c2i, captions, thumbs, mistakes)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main>{"".join(parts)}</main></body></html>\n')


def write_report(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """`build_report` into `path`, through a temporary file so a reader never sees half a page."""
    path = Path(path)
    page = build_report(*args, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
