"""`itsim export`: ONNX and TorchScript graphs of a trained tiny model, run the way a server runs them.

The exported graphs are loaded with onnxruntime and `torch.jit.load` (not through itsim) and must give
itsim's own scores (`Scorer` on the same images and captions, and the model's forward) within 1e-4 on
50 real pairs, at batch 50 and at batch 1 with each caption at its own length. The README's
onnxruntime snippet (docs/onnx_example.py) runs as a subprocess on real image files.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort  # a dev dependency (and the `export` extra): imported, never skipped
import pytest
import torch
from PIL import Image

from itsim.data.loader import read_split
from itsim.errors import UserError
from itsim.model.export import ExportConfig, UnpackedTextEncoder, run
from itsim.model import ItsimModel, ModelConfig, load_model
from itsim.score import Scorer


ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "onnx_example.py"
TOL = 1e-4
N_PAIRS = 50


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported both ways: ONNX through the CLI, TorchScript through `run`."""
    root = tmp_path_factory.mktemp("export")
    cmd = [sys.executable, "-m", "itsim.cli", "export", "--model", str(tiny_model), "--out", str(root / "onnx")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "itsim export: image_encoder.onnx, text_encoder.onnx, head.onnx, vocab.json, export.json" in done.stdout
    assert "checked with onnxruntime" in done.stdout
    run(ExportConfig(model=str(tiny_model), format="torchscript", out=str(root / "torchscript")))
    return {"onnx": root / "onnx", "torchscript": root / "torchscript"}


@pytest.fixture(scope="module")
def pairs(tiny_model, tiny_shards) -> dict:
    """50 pairs over the test split: true and false captions, shouting, punctuation, unknown words, and
    one caption longer than max_len; pixels and ids prepared with itsim, as a client would send them."""
    model, vocab, pre = load_model(tiny_model, "cpu")
    samples = read_split(tiny_shards, "test")
    captions_of = [s["meta"]["captions"] for s in samples]
    image_idx, captions = [], []
    for i in range(N_PAIRS):
        j = i % len(samples)
        own = captions_of[j][i % len(captions_of[j])]
        caption = own if i % 2 == 0 else captions_of[(j + 3) % len(samples)][0]
        image_idx.append(j)
        captions.append(caption)
    captions[1] = captions[1].upper() + "!!! (really?)"
    captions[3] = "a zebra playing the xylophone, in 3 colours"
    captions[5] = " ".join(["a red circle"] * 50)  # 150 tokens: truncated to max_len
    pixels = np.stack([samples[j]["image"] for j in image_idx])
    ids, lengths = vocab.encode(captions, pre.max_len)
    return {"model": model, "pre": pre, "pixels": pixels, "captions": captions,
            "ids": ids.astype(np.int64), "lengths": lengths.astype(np.int64),
            "images": [Image.fromarray(p) for p in pixels]}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _runners(folder: Path, fmt: str) -> dict:
    """Each graph as a function of numpy arrays, loaded without itsim."""
    meta = json.loads((folder / "export.json").read_text())
    out = {}
    for name, graph in meta["graphs"].items():
        path = str(folder / graph["file"])
        if fmt == "onnx":
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            names = [i["name"] for i in graph["inputs"]]
            out[name] = lambda *a, s=session, n=names: s.run(None, dict(zip(n, a)))[0]
        else:
            module = torch.jit.load(path)
            out[name] = lambda *a, m=module: m(*(torch.from_numpy(x) for x in a)).detach().numpy()
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graphs_give_itsims_scores_at_batch_50_and_1(exports, pairs, tiny_model, fmt):
    graph = _runners(exports[fmt], fmt)
    scorer_probs = Scorer.from_dir(tiny_model, device="cpu").score(pairs["images"], pairs["captions"])
    with torch.inference_mode():
        forward_logits = pairs["model"](torch.from_numpy(pairs["pixels"]), torch.from_numpy(pairs["ids"]),
                                        torch.from_numpy(pairs["lengths"])).numpy()
    assert np.isfinite(scorer_probs).all()

    # One batch of 50, every caption padded to max_len.
    logits_50 = graph["head"](graph["image_encoder"](pairs["pixels"]),
                              graph["text_encoder"](pairs["ids"], pairs["lengths"]))
    # Batches of 1, each caption cut to its own length (the length axis is dynamic too).
    logits_1 = np.array([graph["head"](graph["image_encoder"](pairs["pixels"][i:i + 1]),
                                       graph["text_encoder"](pairs["ids"][i:i + 1, :pairs["lengths"][i]],
                                                             pairs["lengths"][i:i + 1]))[0]
                         for i in range(N_PAIRS)])
    assert logits_50.shape == (N_PAIRS,) and logits_1.shape == (N_PAIRS,)
    diffs = {"prob_vs_scorer_b50": np.abs(_sigmoid(logits_50) - scorer_probs).max(),
             "prob_vs_scorer_b1": np.abs(_sigmoid(logits_1) - scorer_probs).max(),
             "logit_vs_forward_b50": np.abs(logits_50 - forward_logits).max(),
             "logit_vs_forward_b1": np.abs(logits_1 - forward_logits).max()}
    print(f"\n{fmt} max abs differences over {N_PAIRS} pairs: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOL, diffs
    assert len(set(np.round(forward_logits, 4))) > 10  # the pairs really differ: the check has teeth


def test_export_json_describes_the_onnx_graphs_and_the_preprocessing(exports, tiny_model):
    folder = exports["onnx"]
    meta = json.loads((folder / "export.json").read_text())
    model_config = json.loads((tiny_model / "config.json").read_text())
    pre = model_config["preprocess"]
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "head.onnx", "image_encoder.onnx",
                                                        "text_encoder.onnx", "vocab.json"]
    assert (folder / "vocab.json").read_bytes() == (tiny_model / "vocab.json").read_bytes()
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert meta["source_model"]["model_sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["graph_format"] == "onnx" and meta["opset"] == 20
    import onnx

    for name in ("image_encoder", "text_encoder", "head"):
        assert [(o.domain, o.version) for o in onnx.load(str(folder / f"{name}.onnx")).opset_import] == [("", 20)]
    assert {k: meta["preprocess"][k] for k in ("image_size", "resize", "max_len")} == pre
    assert meta["preprocess"]["text"]["pattern"] == "[^a-z0-9]+" and meta["preprocess"]["text"]["unk_id"] == 1
    assert "sigmoid(logit)" in meta["score"]["probability"]
    size, dims = pre["image_size"], model_config["model"]
    expected = {"image_encoder": ([("images", "tensor(uint8)", ["batch", size, size, 3])],
                                  [("image_vec", ["batch", dims["image_dim"]])]),
                "text_encoder": ([("ids", "tensor(int64)", ["batch", "length"]),
                                  ("lengths", "tensor(int64)", ["batch"])],
                                 [("text_vec", ["batch", dims["text_dim"]])]),
                "head": ([("image_vec", "tensor(float)", ["batch", dims["image_dim"]]),
                          ("text_vec", "tensor(float)", ["batch", dims["text_dim"]])], [("logit", ["batch"])])}
    for name, (inputs, outputs) in expected.items():
        session = ort.InferenceSession(str(folder / meta["graphs"][name]["file"]), providers=["CPUExecutionProvider"])
        assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == inputs, name
        assert [(o.name, o.shape) for o in session.get_outputs()] == outputs, name
        assert [i["name"] for i in meta["graphs"][name]["inputs"]] == [i[0] for i in inputs]
        assert [i["shape"] for i in meta["graphs"][name]["inputs"]] == [i[2] for i in inputs]
    checked = meta["verification"]
    assert checked["runtime"] == "onnxruntime" and set(checked["max_abs_diff"]) == {
        "image_encoder", "text_encoder", "head", "logit", "probability"}
    assert max(checked["max_abs_diff"].values()) <= 1e-4


def test_readme_snippet_scores_real_image_files_like_itsim(exports, tiny_model, synth_data, tmp_path):
    tree = ast.parse(EXAMPLE.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"json", "re", "sys", "numpy", "onnxruntime", "PIL"}
    body = EXAMPLE.read_text().split("\n", 1)[1]  # all but the docstring line
    assert f"```python\n{body}```" in (ROOT / "README.md").read_text(), "README.md must quote docs/onnx_example.py"
    assert len([line for line in body.splitlines() if line]) <= 15

    jpeg = sorted((synth_data / "images").iterdir())[0]  # a real JPEG, larger than the model's 32 px
    png = tmp_path / "photo.png"
    Image.open(sorted((synth_data / "images").iterdir())[1]).convert("RGB").resize((45, 37)).save(png)
    cases = [(jpeg, "A red circle, on GREY!"), (png, "a zebra playing the xylophone"), (jpeg, "blue")]
    expected = Scorer.from_dir(tiny_model, device="cpu").score([str(p) for p, _ in cases], [c for _, c in cases])
    for (path, caption), want in zip(cases, expected):
        done = subprocess.run([sys.executable, str(EXAMPLE), str(exports["onnx"]), str(path), caption],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        got, want = float(done.stdout.strip()), float(want)  # float64: a float32 difference would round to 0
        print(f"\nsnippet {path.name} {caption!r}: {got:.7f} itsim {want:.7f} diff {abs(got - want):.2e}")
        assert abs(got - want) < TOL


@pytest.mark.parametrize("layers, hidden, text_dim", [(1, 8, 16), (2, 8, 12), (3, 5, 10)])
def test_unpacked_text_encoder_equals_the_packed_one(layers, hidden, text_dim):
    torch.manual_seed(layers)
    model = ItsimModel(ModelConfig(vocab_size=40, embed_dim=6, lstm_hidden=hidden, lstm_layers=layers,
                                   text_dim=text_dim)).eval()
    unpacked = UnpackedTextEncoder(model.text_encoder).eval()
    ids = torch.randint(1, 40, (9, 12))
    lengths = torch.tensor([12, 1, 5, 7, 2, 12, 3, 11, 30])  # 30 > width: clamped like itsim does
    ids[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    with torch.inference_mode():
        assert torch.allclose(unpacked(ids, lengths), model.encode_text(ids, lengths), atol=1e-6)
        assert torch.allclose(unpacked(ids[:, :5], lengths.clamp(max=5)), model.encode_text(ids[:, :5], lengths),
                              atol=1e-6)


def test_bad_requests_fail_with_one_line(exports, tiny_model, tmp_path):
    with pytest.raises(UserError, match="already holds an export; pass --overwrite"):
        run(ExportConfig(model=str(tiny_model), format="torchscript", out=str(exports["torchscript"])))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an itsim export"):
        run(ExportConfig(model=str(tiny_model), out=str(tmp_path)))
    with pytest.raises(UserError, match="not the model directory"):
        run(ExportConfig(model=str(tiny_model), out=str(tiny_model)))
    with pytest.raises(UserError, match="not an itsim model directory"):
        run(ExportConfig(model=str(tmp_path), out=str(tmp_path / "x")))
    # A missing package, for real: the import system refuses onnxscript in this child process.
    code = ("import sys; sys.modules['onnxscript'] = None; from itsim.cli import main; "
            f"sys.exit(main(['export', '--model', {str(tiny_model)!r}, '--out', {str(tmp_path / 'y')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "itsim export: error: ONNX export needs onnxscript: pip install 'itsim[export]'" in done.stderr
    assert not (tmp_path / "y").exists()


def test_overwrite_replaces_an_export_of_the_other_format(exports, tiny_model, tmp_path):
    out = tmp_path / "both"
    shutil.copytree(exports["onnx"], out)
    meta = run(ExportConfig(model=str(tiny_model), format="torchscript", out=str(out), overwrite=True, verify=False))
    assert meta["verification"] is None and meta["graph_format"] == "torchscript"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "head.pt", "image_encoder.pt", "text_encoder.pt",
                                                     "vocab.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["both"]  # the staging folder is gone
