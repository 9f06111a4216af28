"""`itsim eval` end to end on real shards (built from real JPEGs) and a tiny random-weight model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from itsim.data.shards import ShardConfig, build_shards
from itsim.data.loader import iter_split
from itsim.eval.evaluate import EvalConfig, encode_split, evaluate, score_all_pairs
from itsim.model import ItsimModel, ModelConfig, Preprocess, load_model, save_model
from itsim.text import Vocab

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SHAPES = ["circle", "square"]
SPLIT_OF = ["train"] * 6 + ["val"] * 3 + ["test"] * 3


def _image_spec(i: int) -> tuple[str, str]:
    return COLOURS[i % len(COLOURS)], SHAPES[i % 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Images, Karpathy-style captions with fixed splits, shards (2 per eval split), and a model dir."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    entries = []
    for i, split in enumerate(SPLIT_OF):
        colour, shape = _image_spec(i)
        img = Image.new("RGB", (48, 40), "grey")
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((8, 6, 40, 34), fill=colour)
        img.save(images / f"img{i:02d}.jpg", quality=90)
        sentences = [{"raw": f"a {colour} {shape} on grey"}, {"raw": f"{shape} coloured {colour}"}]
        if i % 3 == 0:
            sentences.append({"raw": f"one {colour} thing"})
        entries.append({"filename": f"img{i:02d}.jpg", "split": split, "sentences": sentences})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    shards = root / "shards"
    build_shards(ShardConfig(captions=str(root / "captions.json"), images=str(images), out=str(shards),
                             image_size=32, max_len=8, shard_size=2, workers=1))
    vocab = Vocab.load(shards / "vocab.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab), channels=(4, 8), image_dim=16, embed_dim=8, lstm_hidden=8,
                      lstm_layers=1, text_dim=16, head_dim=12)
    model = ItsimModel(cfg)
    bn = model.fusion.net[1]  # non-trivial running statistics, so folding them is really tested
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    save_model(root / "run" / "model", model, vocab, Preprocess(image_size=32, resize="stretch", max_len=8))
    lines = [{"step": s, "loss": 0.7 - s / 1000, "train_acc": 0.5 + s / 1000} for s in (10, 20, 30)]
    lines.append({"step": 30, "val_loss": 0.6, "val_accuracy": 0.6, "val_roc_auc": 0.65})
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _captions_in(split: str) -> int:
    return sum(3 if i % 3 == 0 else 2 for i, s in enumerate(SPLIT_OF) if s == split)


def _every_pair_by_forward(run, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [images, captions] from the whole model on every pair, caption -> image index):
    the reference the metrics below are recomputed from, without the encode-once path."""
    model, _, _ = load_model(run / "run" / "model", "cpu")
    samples = list(iter_split(run / "shards", split))
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    ids = torch.from_numpy(np.concatenate([s["ids"] for s in samples])).long()
    lengths = torch.from_numpy(np.concatenate([s["lengths"] for s in samples])).long()
    n_img, n_cap = images.shape[0], ids.shape[0]
    with torch.no_grad():
        logits = model(images.repeat_interleave(n_cap, dim=0), ids.repeat(n_img, 1), lengths.repeat(n_img))
    caption_to_image = np.repeat(np.arange(n_img), [s["ids"].shape[0] for s in samples])
    return torch.sigmoid(logits.view(n_img, n_cap)).double().numpy(), caption_to_image


def _fixed_pairs(probs: np.ndarray, caption_to_image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from itsim.data.pairs import fixed_balanced_pairs

    image_idx, caption_idx, labels = fixed_balanced_pairs(caption_to_image, seed)
    return probs[image_idx, caption_idx], labels


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def _average_precision(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([((p >= p[i]) & (y == 1)).sum() / (p >= p[i]).sum() for i in np.flatnonzero(y == 1)]))


def _accuracy(p: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(np.mean((p >= t) == (y == 1)))


def _ranks(matrix: np.ndarray, c2i: np.ndarray) -> tuple[list[int], list[int]]:
    """1-based ranks, ties counted against the true item, by loops over the matrix."""
    n_img, n_cap = matrix.shape
    i2t = [1 + sum(matrix[i, c] >= matrix[i, c2i == i].max() for c in range(n_cap) if c2i[c] != i)
           for i in range(n_img)]
    t2i = [1 + sum(matrix[j, c] >= matrix[c2i[c], c] for j in range(n_img) if j != c2i[c]) for c in range(n_cap)]
    return i2t, t2i


def test_evaluate_test_split_writes_metrics_and_plots(run):
    from itsim import evaluate_model as public_evaluate  # the package's public API, as users import it

    result = public_evaluate(EvalConfig(model=str(run / "run" / "model"), shards=str(run / "shards"), split="test",
                                 batch_size=2))
    out = run / "run" / "eval"
    assert result["out"] == str(out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_images"] == 3 and saved["n_captions"] == _captions_in("test") == 7
    assert saved["threshold_source"] == "val"
    assert saved["retrieval_images"] == 3 and saved["retrieval_captions"] == 7
    assert saved["skipped_samples"] == 0 and saved["skipped_reasons"] == {}
    assert saved["n_pairs"] == saved["n_captions"]

    # Every metric recomputed from the whole model run on every pair and plain formulas.
    probs, c2i = _every_pair_by_forward(run, "test")
    p, y = _fixed_pairs(probs, c2i, seed=0)
    assert 0 < y.sum() < y.size and saved["positive_pairs"] == int(y.sum())  # both classes: every metric defined
    gaps = np.abs(p[:, None] - p[None, :])[~np.eye(p.size, dtype=bool)]
    assert gaps.min() > 1e-5, "near-tied scores: the ranking metrics below would be fragile"
    floats = ("balanced_accuracy", "accuracy_at_0_5", "f1_at_0_5", "accuracy_at_best", "balanced_accuracy_at_best",
              "best_threshold", "roc_auc", "pr_auc", "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
              "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr")
    for key in floats:
        assert type(saved[key]) is float or (type(saved[key]) is int and key.endswith("medr")), (key, saved[key])
    tpr, tnr = np.mean(p[y == 1] >= 0.5), np.mean(p[y == 0] < 0.5)
    assert saved["accuracy_at_0_5"] == pytest.approx(_accuracy(p, y, 0.5), abs=1e-12)
    assert saved["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2, abs=1e-12)
    assert saved["roc_auc"] == pytest.approx(_auc(p, y), abs=1e-12)
    assert saved["pr_auc"] == pytest.approx(_average_precision(p, y), abs=1e-12)
    # The threshold comes from the val split: the best accuracy any cut reaches on val's fixed pairs.
    val_p, val_y = _fixed_pairs(*_every_pair_by_forward(run, "val"), seed=0)
    t = saved["best_threshold"]
    assert 0.0 <= t <= 1.0
    best_on_val = max(_accuracy(val_p, val_y, c) for c in [*val_p, np.inf])
    assert _accuracy(val_p, val_y, t) == pytest.approx(best_on_val, abs=1e-12)
    assert saved["accuracy_at_best"] == pytest.approx(_accuracy(p, y, t), abs=1e-12)
    i2t, t2i = _ranks(probs, c2i)
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert saved[f"{prefix}_r{k}"] == pytest.approx(np.mean(np.array(ranks) <= k), abs=1e-12)
        assert saved[f"{prefix}_medr"] == float(np.median(ranks)) and saved[f"{prefix}_meanr"] == pytest.approx(
            np.mean(ranks), abs=1e-12)
    assert saved["i2t_r5"] == saved["t2i_r5"] == saved["i2t_r10"] == saved["t2i_r10"] == 1.0  # 3 images, 7 captions
    assert 1 <= saved["i2t_medr"] <= 3 and 1 <= saved["t2i_medr"] <= 3
    assert saved["retrieval_seconds"] >= 0
    for name in ("roc.png", "score_hist.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(saved["plots"]) == ["roc.png", "score_hist.png", "training_curves.png"]


def test_retrieval_matrix_equals_forward_on_every_pair(run):
    model, vocab, pre = load_model(run / "run" / "model", "cpu")
    enc = encode_split(model, vocab, pre, run / "shards", "val", batch_size=2, device=torch.device("cpu"))
    samples = list(iter_split(run / "shards", "val"))
    assert [s["key"] for s in samples] == enc.keys
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    ids = torch.from_numpy(np.concatenate([s["ids"] for s in samples])).long()
    lengths = torch.from_numpy(np.concatenate([s["lengths"] for s in samples])).long()
    n_img, n_cap = images.shape[0], ids.shape[0]
    with torch.no_grad():
        brute = model(images.repeat_interleave(n_cap, dim=0), ids.repeat(n_img, 1), lengths.repeat(n_img))
    brute = brute.view(n_img, n_cap)
    for max_elements in (1 << 22, 7):  # one chunk, and many small chunks
        fast = score_all_pairs(model, enc.image_vecs, enc.caption_vecs, max_elements=max_elements)
        assert torch.allclose(fast, brute, atol=1e-5), (fast - brute).abs().max()


def test_val_split_pairs_match_training_validation(run):
    from itsim.train.validate import ValidationSet

    model, _, _ = load_model(run / "run" / "model", "cpu")
    during_training = ValidationSet.from_shards(run / "shards", "val").evaluate(model, torch.device("cpu"))
    result = evaluate(EvalConfig(model=str(run / "run" / "model"), shards=str(run / "shards"), split="val",
                                 out=str(run / "eval_val"), plots=False))
    assert result["n_pairs"] == during_training["val_pairs"]
    assert result["accuracy_at_0_5"] == pytest.approx(during_training["val_accuracy"])
    assert result["roc_auc"] == pytest.approx(during_training["val_roc_auc"])


def test_score_all_pairs_falls_back_to_the_head_for_other_architectures(run):
    model, _, _ = load_model(run / "run" / "model", "cpu")
    torch.manual_seed(1)
    model.fusion.net = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).eval()
    img, txt = torch.randn(5, 16), torch.randn(7, 16)
    fast = score_all_pairs(model, img, txt, max_elements=100)
    with torch.no_grad():
        expected = torch.stack([model.head(img[i].expand(7, -1), txt) for i in range(5)])
    assert torch.allclose(fast, expected, atol=1e-6)


def test_labelled_pair_file_counts_every_row(run):
    images = run / "images"
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    rows = ["image\tcaption\tlabel",
            "img09.jpg\ta red circle on grey\tmatch",
            "img09.jpg\ta blue square\tno-match",
            "img10.jpg\tsquare coloured green\tmatch",
            "img11.jpg\ta red circle\tno-match",
            "missing.jpg\ta dog\tmatch",
            "../outside.jpg\ta cat\tno-match",
            "broken.jpg\ta cat\tmatch",
            "img10.jpg without tabs",
            "img10.jpg\ta thing\tmaybe"]
    pairs = run / "pairs.tsv"
    pairs.write_text("\n".join(rows) + "\n")
    out = run / "eval_pairs"
    result = evaluate(EvalConfig(model=str(run / "run" / "model"), shards=str(run / "shards"), split="val",
                                 pairs=str(pairs), images=str(images), out=str(out), plots=False))
    assert result["threshold_source"].startswith("val (the evaluated split itself")
    assert result["pairs_rows"] == 9
    assert result["pairs_scored"] == 4
    assert result["pairs_skipped"] == 5
    assert result["pairs_skipped_reasons"] == {"parse_missing_delimiter": 1, "parse_bad_label": 1,
                                               "image_missing": 1, "image_path_escape": 1,
                                               "image_not_an_image": 1}
    assert result["pairs_tn"] + result["pairs_fp"] + result["pairs_fn"] + result["pairs_tp"] == 4
    assert result["pairs_tp"] + result["pairs_fn"] == 2
    assert result["pairs_threshold"] == result["best_threshold"]
    for key in ("pairs_accuracy", "pairs_balanced_accuracy", "pairs_precision", "pairs_recall", "pairs_f1",
                "pairs_roc_auc", "pairs_accuracy_at_0_5"):
        assert 0.0 <= result[key] <= 1.0, key
    assert not (out / "roc.png").exists()
    assert json.loads((out / "metrics.json").read_text())["pairs_scored"] == 4


def test_cli_eval_prints_summary_and_rejects_unknown_split(run):
    out = run / "eval_cli"
    cmd = [sys.executable, "-m", "itsim.cli", "eval", "--model", str(run / "run" / "model"),
           "--shards", str(run / "shards"), "--split", "val", "--out", str(out), "--no-plots", "--seed", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "roc_auc" in done.stdout and "t2i_r1" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3
    bad = subprocess.run(cmd[:8] + ["--split", "nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2
    assert "split 'nope' has no shards" in bad.stderr and "Traceback" not in bad.stderr
