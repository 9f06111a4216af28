"""report.html: `itsim eval` on a trained tiny model, and the page builder on hand-made data.

The page is parsed with Python's html.parser into a small tree and checked against numbers computed
independently here: metrics.json, the model's own score matrix (top-5 lists must be its argsort), the
fixed balanced pairs (mistakes must be the extreme ones), the plot files' bytes.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from itsim.eval import metrics
from itsim.data.loader import read_split
from itsim.eval.evaluate import EvalConfig, encode_split, evaluate, fixed_pair_scores
from itsim.model import score_all_pairs
from itsim.model import load_model
from itsim.eval.report import PairScores, build_report

ROOT = Path(__file__).resolve().parents[2]
VOID = {"img", "meta", "br", "hr", "link", "input", "source"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(self.texts[:1] + [c.text() + t for c, t in zip(self.children, self.texts[1:] + [""] * 99)])

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["Node"]:
        found = []
        for child in self.children:
            if ((tag is None or child.tag == tag) and (cls is None or cls in child.classes)
                    and all(child.attrs.get(k) == v for k, v in attrs.items())):
                found.append(child)
            found.extend(child.find_all(tag, cls, **attrs))
        return found

    def one(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "Node":
        found = self.find_all(tag, cls, **attrs)
        assert len(found) == 1, (tag, cls, attrs, len(found))
        return found[0]


class TreeBuilder(HTMLParser):
    """html.parser events -> Node tree; end tags must close what they open (the page is well-formed)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {}, None)
        self.node.texts.append("")

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(node)
        self.node.texts.append("")
        node.texts.append("")
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
        self.node = self.node.parent

    def handle_data(self, data):
        self.node.texts[-1] += data


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.node is builder.root, "unclosed elements"
    return builder.root


def _text_of(node: Node) -> str:
    return " ".join(node.text().split())


def _assert_self_contained(page: str, tree: Node) -> None:
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "//cdn" not in lowered
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered and "url(" not in lowered
    images = tree.find_all("img")
    assert images and all(img.attrs["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
                          for img in images)


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_shards, tmp_path_factory) -> dict:
    """`itsim eval` on the test split through the CLI, plus the model's own numbers to check against."""
    out = tmp_path_factory.mktemp("report") / "eval"
    cmd = [sys.executable, "-m", "itsim.cli", "eval", "--model", str(tiny_model), "--shards", str(tiny_shards),
           "--split", "test", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    model, vocab, pre = load_model(tiny_model, "cpu")
    enc = encode_split(model, vocab, pre, tiny_shards, "test", batch_size=64, device=torch.device("cpu"))
    probs, labels = fixed_pair_scores(model, enc, seed=0)
    samples = read_split(tiny_shards, "test")
    page = (out / "report.html").read_text(encoding="utf-8")
    return {"out": out, "page": page, "tree": parse(page), "metrics": json.loads((out / "metrics.json").read_text()),
            "matrix": torch.sigmoid(score_all_pairs(model, enc.image_vecs, enc.caption_vecs)).numpy(),
            "c2i": enc.caption_to_image, "captions": [c for s in samples for c in s["meta"]["captions"]],
            "keys": [s["key"] for s in samples], "pair_probs": probs, "pair_labels": labels}


def test_report_metrics_table_holds_every_value_of_metrics_json(evaluated):
    table = evaluated["tree"].one("table", id="metrics")
    rows = table.find_all("tr")
    saved = evaluated["metrics"]
    assert [r.attrs["data-key"] for r in rows] == list(saved)
    for row in rows:
        key = row.attrs["data-key"]
        assert json.loads(row.attrs["data-value"]) == saved[key], key
        assert _text_of(row.one("th")) == key
    shown = {r.attrs["data-key"]: _text_of(r.one("td")) for r in rows}
    for key in ("balanced_accuracy", "roc_auc", "pr_auc", "i2t_r1", "t2i_r5"):
        assert shown[key] == f"{saved[key]:.4f}", key
    assert shown["n_images"] == str(saved["n_images"]) and shown["split"] == "test"


def test_report_embeds_the_plot_files_and_nothing_from_the_network(evaluated):
    tree, out = evaluated["tree"], evaluated["out"]
    figures = tree.one("section", id="plots").find_all("img")
    assert sorted(f.attrs["alt"] for f in figures) == sorted(evaluated["metrics"]["plots"]) == [
        "roc.png", "score_hist.png", "training_curves.png"]
    for img in figures:
        prefix, data = img.attrs["src"].split(",", 1)
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(data) == (out / img.attrs["alt"]).read_bytes()
    _assert_self_contained(evaluated["page"], tree)


def test_report_image_queries_list_the_models_top_5_captions_with_true_ones_marked(evaluated):
    matrix, c2i, captions = evaluated["matrix"], evaluated["c2i"], evaluated["captions"]
    blocks = evaluated["tree"].one("section", id="image-to-text").find_all("div", cls="image-query")
    assert len(blocks) == min(12, matrix.shape[0]) == 12
    i2t_ranks, _ = metrics.retrieval_ranks(matrix, c2i)
    for block in blocks:
        i = int(block.attrs["data-image"])
        assert block.one("img").attrs["alt"] == evaluated["keys"][i]
        items = block.one("ol").find_all("li")
        shown = [int(li.attrs["data-caption"]) for li in items]
        assert len(items) == 5
        assert np.allclose(matrix[i, shown], np.sort(matrix[i])[::-1][:5], atol=1e-6)  # the model's top 5
        for li, c in zip(items, shown):
            assert ("true" in li.classes) == (c2i[c] == i) and ("false" in li.classes) == (c2i[c] != i)
            assert _text_of(li) == f"{matrix[i, c]:.3f} {' '.join(captions[c].split())}"
        rank = block.find_all("p", cls="rank")
        if i2t_ranks[i] > 5:
            assert _text_of(rank[0]) == f"first true caption at rank {i2t_ranks[i]} of {matrix.shape[1]}"
        else:
            assert not rank and any("true" in li.classes for li in items)


def test_report_caption_queries_show_the_models_top_5_images(evaluated):
    matrix, c2i, captions = evaluated["matrix"], evaluated["c2i"], evaluated["captions"]
    blocks = evaluated["tree"].one("section", id="text-to-image").find_all("div", cls="caption-query")
    assert len(blocks) == 12
    for block in blocks:
        c = int(block.attrs["data-caption"])
        assert _text_of(block.find_all("p")[0]) == f"“{' '.join(captions[c].split())}”"
        items = block.one("ol").find_all("li")
        shown = [int(li.attrs["data-image"]) for li in items]
        assert len(items) == 5 and len(set(shown)) == 5
        assert np.allclose(matrix[shown, c], np.sort(matrix[:, c])[::-1][:5], atol=1e-6)
        for li, i in zip(items, shown):
            assert ("true" in li.classes) == (c2i[c] == i)
            assert li.one("img").attrs["src"].startswith("data:image/jpeg;base64,")


def test_report_mistakes_are_the_most_confident_wrong_pairs(evaluated):
    section = evaluated["tree"].one("section", id="mistakes")
    probs, labels, c2i = evaluated["pair_probs"], evaluated["pair_labels"], evaluated["c2i"]
    keys, captions = evaluated["keys"], evaluated["captions"]
    for box, label, worst in (("false-positives", 0, np.sort(probs[labels == 0])[::-1][:8]),
                              ("false-negatives", 1, np.sort(probs[labels == 1])[:8])):
        cards = section.one("div", id=box).find_all("div", cls="pair")
        assert len(cards) == 8
        scores = np.array([float(card.attrs["data-score"]) for card in cards])
        assert np.allclose(scores, worst, atol=1e-9), box
        for card in cards:
            i, c = int(card.attrs["data-image"]), int(card.attrs["data-caption"])
            assert (c2i[c] == i) == bool(label)
            images = card.find_all("img")  # the pair's image, and for a false pair the caption's own image
            assert [img.attrs["alt"] for img in images] == [keys[i]] + ([] if label else [keys[c2i[c]]])
            caption = " ".join(captions[c].split())
            assert _text_of(card).startswith(f"{float(card.attrs['data-score']):.3f} “{caption}”")


def test_no_report_flag_writes_no_page(tiny_model, tiny_shards, tmp_path):
    evaluate(EvalConfig(model=str(tiny_model), shards=str(tiny_shards), split="val", out=str(tmp_path),
                        plots=False, report=False))
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "report.html").exists()


# --- the builder on hand-made data ----------------------------------------------------------------

def test_build_report_on_plain_data_escapes_text_and_marks_truth():
    rng = np.random.default_rng(0)
    thumbs = [rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8) for _ in range(3)]
    captions = ['<script>alert("x")</script> & a dog', "a cat", "two birds", "a red 'car'"]
    c2i = np.array([0, 0, 1, 2])
    scores = np.array([[0.9, 0.2, 0.8, 0.1],  # image 0: its captions 0 (true), then 2 (false), 1 (true)
                       [0.3, 0.4, 0.5, 0.6],  # image 1: caption 2 ranks 2nd behind caption 3
                       [0.1, 0.1, 0.2, 0.7]])
    pairs = PairScores(image_idx=np.array([0, 1, 1, 2]), caption_idx=np.array([0, 1, 2, 3]),
                       labels=np.array([1, 0, 1, 1]), probs=np.array([0.9, 0.4, 0.5, 0.7]))
    page = build_report({"split": "val", "roc_auc": 0.75, "n_images": 3, "note": "<b>bold</b>"}, scores, c2i,
                        captions, thumbs, image_names=["a.jpg", "b<1>.jpg", "c.jpg"], pairs=pairs)
    tree = parse(page)
    _assert_self_contained(page, tree)
    assert "<script>" not in page and "<b>bold" not in page and tree.find_all("script") == []
    rows = {r.attrs["data-key"]: _text_of(r.one("td")) for r in tree.one("table", id="metrics").find_all("tr")}
    assert rows == {"split": "val", "roc_auc": "0.7500", "n_images": "3", "note": "<b>bold</b>"}

    blocks = tree.one("section", id="image-to-text").find_all("div", cls="image-query")
    assert [b.attrs["data-image"] for b in blocks] == ["0", "1", "2"]  # min(12, 3)
    first = blocks[0].one("ol").find_all("li")
    assert [li.attrs["data-caption"] for li in first] == ["0", "2", "1", "3"]  # min(5, 4) captions
    assert [("true" in li.classes) for li in first] == [True, False, True, False]
    assert _text_of(first[0]) == '0.900 <script>alert("x")</script> & a dog'
    assert blocks[1].find_all("p", cls="rank") == []  # its true caption is 2nd: inside the top 5
    assert blocks[1].one("img").attrs["alt"] == "b<1>.jpg"

    queries = tree.one("section", id="text-to-image").find_all("div", cls="caption-query")
    assert [q.attrs["data-caption"] for q in queries] == ["0", "1", "2", "3"]
    assert [li.attrs["data-image"] for li in queries[2].one("ol").find_all("li")] == ["0", "1", "2"]
    assert [("true" in li.classes) for li in queries[2].one("ol").find_all("li")] == [False, True, False]

    mistakes = tree.one("section", id="mistakes")
    fp = mistakes.one("div", id="false-positives").find_all("div", cls="pair")
    fn = mistakes.one("div", id="false-negatives").find_all("div", cls="pair")
    assert [(p.attrs["data-image"], p.attrs["data-caption"]) for p in fp] == [("1", "1")]
    assert [(p.attrs["data-image"], p.attrs["data-caption"]) for p in fn] == [("1", "2"), ("2", "3"), ("0", "0")]
    assert "the caption belongs to a.jpg" in _text_of(fp[0])

    top1 = parse(build_report({}, scores, c2i, captions, thumbs, top_k=1))
    blocks = top1.one("section", id="image-to-text").find_all("div", cls="image-query")
    assert [_text_of(b.find_all("p", cls="rank")[0]) if b.find_all("p", cls="rank") else None for b in blocks] == [
        None, "first true caption at rank 2 of 4", None]
    queries = top1.one("section", id="text-to-image").find_all("div", cls="caption-query")
    assert [_text_of(q.find_all("p", cls="rank")[0]) if q.find_all("p", cls="rank") else None for q in queries] == [
        None, "its image is at rank 2 of 3", "its image is at rank 2 of 3", None]
    assert top1.find_all("section", id="mistakes") == []  # no pairs given


def test_build_report_rejects_inconsistent_inputs_and_marks_missing_thumbnails():
    with pytest.raises(ValueError, match="disagree"):
        build_report({}, np.zeros((2, 3)), [0, 1], ["a", "b"], [])
    page = build_report({}, np.array([[0.5, 0.1], [0.2, 0.9]]), [0, 1], ["a", "b"], [b"\xff\xd8 jpeg bytes"])
    tree = parse(page)
    assert len(tree.find_all("img")) == 3  # image 0 in each of its places; image 1 has no thumbnail
    assert len(tree.find_all("span", cls="missing")) == 3
