"""`itsim export`: a trained model as three ONNX or TorchScript graphs that a server runs without itsim.

The graphs are the model's own parts, so a server can encode each image and caption once and run only
the small head over many pairs, as `itsim eval` and `itsim score --mode topk` do:
- `image_encoder`: uint8 RGB pixels [batch, S, S, 3] (S = the model's image size) -> image vectors; the
  scaling to [0, 1] is inside the graph, so a client sends raw resized pixels;
- `text_encoder`: token ids int64 [batch, length] + lengths int64 [batch] -> caption vectors;
- `head`: (image vectors, caption vectors) [batch, .] -> logits [batch]; probability = sigmoid(logit).
Batch (and the text length) are dynamic. Beside them: a copy of `vocab.json` and `export.json`, which
says what goes in and out and how to prepare images and captions. Every export is checked before it is
written: the exported graphs, run by onnxruntime or `torch.jit.load`, must give the model's numbers
within 1e-4 at two batch sizes and two text lengths.

The model's text encoder packs its sequences (`pack_padded_sequence`), which neither exporter takes
with dynamic shapes (torch.export stops at the data-dependent `lengths.max()`, the TorchScript-based
ONNX exporter bakes the example's length into the graph, `torch.jit.script` rejects the autocast
call). `UnpackedTextEncoder` computes the same BiLSTM states with fixed-shape ops instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import nn

from itsim import __version__, config, storage
from itsim.errors import UserError
from itsim.model import ItsimModel, Preprocess, load_model
from itsim.model.network import pool_outputs

log = logging.getLogger(__name__)

GRAPHS = ("image_encoder", "text_encoder", "head")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4
# Names an export folder may hold: a re-export replaces exactly these and refuses a folder with others.
OWNED = {"export.json", "vocab.json", *(g + s for g in GRAPHS for s in SUFFIX.values())}


@dataclasses.dataclass
class ExportConfig:
    model: str = dataclasses.field(default="", metadata={"help": "model directory (RUN/model)"})
    format: Literal["onnx", "torchscript"] = dataclasses.field(
        default="onnx", metadata={"help": "onnx (onnxruntime, TensorRT, ...) or torchscript (torch.jit.load)"})
    out: str = dataclasses.field(default="", metadata={"help": "output folder (new, or an earlier export)"})
    opset: int = dataclasses.field(default=20, metadata={"help": "ONNX opset version"})
    verify: bool = dataclasses.field(
        default=True, metadata={"help": "run the exported graphs and compare them with the model (1e-4)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an earlier export in --out"})


class UnpackedTextEncoder(nn.Module):
    """The model's BiLSTM text encoder without packed sequences, for export; the same numbers.

    Per layer the forward direction runs over the padded ids as they are (its state at position
    length-1 has seen only real tokens), and the backward direction runs as a forward LSTM over each
    sequence reversed within its length (position t <-> length-1-t, padding left in place), whose
    outputs are reversed back before they feed the next layer. The final states are gathered at
    length-1. Padding positions compute values nobody reads: the price of fixed shapes.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        lstm = encoder.lstm
        if not (isinstance(lstm, nn.LSTM) and lstm.bidirectional and lstm.batch_first and lstm.proj_size == 0):
            raise ValueError("UnpackedTextEncoder expects a batch-first bidirectional nn.LSTM without projections")
        self.embed = encoder.embed
        self.proj = encoder.proj
        self.pool = getattr(encoder, "pool", "last")
        self.forward_layers = nn.ModuleList(_one_direction(lstm, k, "") for k in range(lstm.num_layers))
        self.backward_layers = nn.ModuleList(_one_direction(lstm, k, "_reverse") for k in range(lstm.num_layers))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        width = ids.shape[1]
        lengths = lengths.long().clamp(min=1, max=width)
        positions = torch.arange(width, device=ids.device).unsqueeze(0)
        lens = lengths.unsqueeze(1)
        reverse = torch.where(positions < lens, lens - 1 - positions, positions)  # its own inverse
        x = self.embed(ids.long()).float()
        out_fwd = x
        out_bwd_reversed = x
        for fwd, bwd in zip(self.forward_layers, self.backward_layers):
            out_fwd, _ = fwd(x)
            out_bwd_reversed, _ = bwd(_gather_steps(x, reverse))
            x = torch.cat([out_fwd, _gather_steps(out_bwd_reversed, reverse)], dim=2)
        if self.pool != "last":
            return self.proj(pool_outputs(x, lengths, self.pool))
        last = (lengths - 1).unsqueeze(1)
        final = torch.cat([_gather_steps(out_fwd, last).squeeze(1), _gather_steps(out_bwd_reversed, last).squeeze(1)],
                          dim=1)
        return self.proj(final)


def _gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] -> x[b, index[b, t], :] for each (b, t) of index [B, T]."""
    return torch.gather(x, 1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _one_direction(lstm: nn.LSTM, layer: int, suffix: str) -> nn.LSTM:
    """One layer and direction of `lstm` as a one-layer forward nn.LSTM with copied weights."""
    inputs = lstm.input_size if layer == 0 else 2 * lstm.hidden_size
    one = nn.LSTM(inputs, lstm.hidden_size, batch_first=True, bias=lstm.bias)
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if lstm.bias else ("weight_ih", "weight_hh")
    with torch.no_grad():
        for name in names:
            getattr(one, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{layer}{suffix}"))
    return one.eval()


# --- the three graphs -------------------------------------------------------------------------

@dataclasses.dataclass
class Graph:
    """One exported graph: the module, example inputs, and the names and dynamic axes it gets."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def graphs(model: ItsimModel, pre: Preprocess) -> list[Graph]:
    """The image encoder, the unpacked text encoder and the head, with examples of batch 2 (not 1:
    torch.export would specialise a batch of 1)."""
    cfg, size = model.cfg, pre.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=gen)
    ids = torch.randint(2, max(3, cfg.vocab_size), (2, pre.max_len), generator=gen)
    lengths = torch.tensor([pre.max_len, max(1, pre.max_len // 2)])
    vec = {"dtype": "float32"}
    return [
        Graph("image_encoder", model.image_encoder.eval(), (images,),
              [{"name": "images", "dtype": "uint8", "shape": ["batch", size, size, 3]}],
              [{"name": "image_vec", **vec, "shape": ["batch", cfg.image_dim]}]),
        Graph("text_encoder", UnpackedTextEncoder(model.text_encoder).eval(), (ids, lengths),
              [{"name": "ids", "dtype": "int64", "shape": ["batch", "length"]},
               {"name": "lengths", "dtype": "int64", "shape": ["batch"]}],
              [{"name": "text_vec", **vec, "shape": ["batch", cfg.text_dim]}]),
        Graph("head", model.fusion.eval(), (torch.zeros(2, cfg.image_dim), torch.zeros(2, cfg.text_dim)),
              [{"name": "image_vec", **vec, "shape": ["batch", cfg.image_dim]},
               {"name": "text_vec", **vec, "shape": ["batch", cfg.text_dim]}],
              [{"name": "logit", **vec, "shape": ["batch"]}]),
    ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress prints, deprecation notes and 'torchvision is not installed' log lines
    say nothing about this model; they would bury the one line `itsim export` prints."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_onnx(graph: Graph, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    dims: dict[str, dict[int, Any]] = {}
    for spec in graph.inputs:
        dims[spec["name"]] = {0: batch}
        if "length" in spec["shape"]:
            dims[spec["name"]][spec["shape"].index("length")] = torch.export.Dim("length", min=1)
    torch.onnx.export(graph.module, graph.example, str(path), input_names=[s["name"] for s in graph.inputs],
                      output_names=[s["name"] for s in graph.outputs], dynamic_shapes=dims, dynamo=True,
                      opset_version=opset, external_data=False, verbose=False)


def written_opset(folder: Path) -> int:
    """The default-domain opset the exporter really wrote: it raises a too-low request to its minimum."""
    import onnx

    versions = {next((o.version for o in onnx.load(str(folder / f"{g}.onnx"), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), 0) for g in GRAPHS}
    if len(versions) != 1:
        raise UserError(f"the exported graphs disagree on their opset: {sorted(versions)}")
    return versions.pop()


def _export_torchscript(graph: Graph, path: Path) -> None:
    torch.jit.script(graph.module).save(str(path))


def require(fmt: str, verify: bool) -> None:
    """A clear error, before any work, when a package the format needs is missing."""
    needed = {"onnx": ["onnx", "onnxscript"] + (["onnxruntime"] if verify else []), "torchscript": []}[fmt]
    missing = []
    for name in needed:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        hint = " (or --no-verify to skip the onnxruntime check)" if missing == ["onnxruntime"] else ""
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'itsim[export]'{hint}")


# --- running an export (verification) ---------------------------------------------------------

def load_runner(path: Path, fmt: str) -> Callable[..., np.ndarray]:
    """A function from numpy inputs (in the graph's input order) to its one numpy output."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, dict(zip(names, arrays)))[0]
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(*arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in arrays)).numpy()
    return run


def verification_inputs(model: ItsimModel, pre: Preprocess, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Batches of 1 and 3 pairs: random pixels, ids at full and at a shorter width, random lengths."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch, width in ((1, pre.max_len), (3, max(1, pre.max_len // 2 + 1))):
        lengths = rng.integers(1, width + 1, size=batch)
        lengths[0] = width
        ids = rng.integers(1, model.cfg.vocab_size, size=(batch, width))
        ids[np.arange(width)[None, :] >= lengths[:, None]] = 0
        cases.append({"images": rng.integers(0, 256, size=(batch, pre.image_size, pre.image_size, 3), dtype=np.uint8),
                      "ids": ids.astype(np.int64), "lengths": lengths.astype(np.int64)})
    return cases


@torch.inference_mode()
def verify(folder: Path, fmt: str, model: ItsimModel, pre: Preprocess) -> dict[str, float]:
    """Largest differences between the exported graphs and the model, per graph and end to end.

    The reference is itsim's own path (`encode_image`, `encode_text` with its packed LSTM, `head`);
    the end-to-end check chains the three exported graphs as a server would.
    """
    run = {g: load_runner(folder / f"{g}{SUFFIX[fmt]}", fmt) for g in GRAPHS}
    worst = dict.fromkeys(("image_encoder", "text_encoder", "head", "logit", "probability"), 0.0)
    for case in verification_inputs(model, pre):
        img_ref = model.encode_image(torch.from_numpy(case["images"]))
        txt_ref = model.encode_text(torch.from_numpy(case["ids"]), torch.from_numpy(case["lengths"]))
        logit_ref = model.head(img_ref, txt_ref).numpy()
        img = run["image_encoder"](case["images"])
        txt = run["text_encoder"](case["ids"], case["lengths"])
        logit = run["head"](img, txt)
        diffs = {"image_encoder": np.abs(img - img_ref.numpy()).max(),
                 "text_encoder": np.abs(txt - txt_ref.numpy()).max(),
                 "head": np.abs(run["head"](img_ref.numpy(), txt_ref.numpy()) - logit_ref).max(),
                 "logit": np.abs(logit - logit_ref).max(),
                 "probability": np.abs(_sigmoid(logit) - _sigmoid(logit_ref)).max()}
        worst = {k: max(worst[k], float(diffs[k])) for k in worst}
    return worst


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


# --- the job ----------------------------------------------------------------------------------

def describe(cfg: ExportConfig, model_dir: Path, model: ItsimModel, pre: Preprocess, vocab_hash: str,
             specs: list[Graph], checked: dict[str, float] | None, opset: int | None) -> dict[str, Any]:
    """export.json: everything a client needs to prepare inputs and read the output, without itsim."""
    with open(model_dir / "model.safetensors", "rb") as f:
        weights_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "format": "itsim-export", "format_version": 1, "itsim_version": __version__, "torch_version": torch.__version__,
        "graph_format": cfg.format, **({"opset": opset} if opset is not None else {}),
        "source_model": {"path": str(model_dir), "model_sha256": weights_sha256,
                         "vocab_hash": vocab_hash},
        "graphs": {g.name: {"file": g.name + SUFFIX[cfg.format], "inputs": g.inputs, "outputs": g.outputs}
                   for g in specs},
        "preprocess": {
            "image_size": pre.image_size, "resize": pre.resize, "max_len": pre.max_len,
            "image": f"RGB uint8 0-255, [batch, {pre.image_size}, {pre.image_size}, 3] (NHWC), resized to "
                     f"{pre.image_size}x{pre.image_size} by '{pre.resize}' with PIL bicubic (itsim.images.resize: "
                     "stretch = Image.resize(..., BICUBIC, reducing_gap=3.0)); the graph scales to [0, 1]",
            "text": {"normalize": "lowercase, replace every run of characters outside [a-z0-9] by one space, strip",
                     "pattern": "[^a-z0-9]+", "tokens": "split on spaces, keep the first max_len",
                     "ids": "index of the token in vocab.json 'words'; unknown tokens are 1 (<unk>)",
                     "pad_id": 0, "unk_id": 1, "empty_caption": "ids [1], length 1",
                     "lengths": "tokens kept (at least 1); pad ids with 0 to any common width"},
        },
        "score": {"output": "logit", "probability": "sigmoid(logit) = 1 / (1 + exp(-logit))",
                  "pairs": "image_vec[i] with text_vec[i]; repeat or index vectors to score every image x caption"},
        "text_encoder": "BiLSTM run without packed sequences (itsim's UnpackedTextEncoder): the same numbers",
        "verification": ({"max_abs_diff": checked, "tolerance": TOLERANCE, "batch_sizes": [1, 3],
                          "runtime": "onnxruntime" if cfg.format == "onnx" else "torch.jit.load"}
                         if checked is not None else None),
    }


def _check_out(out: Path, model_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.resolve() == model_dir:
        raise UserError("--out must be a folder of its own, not the model directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
    if foreign:
        raise UserError(f"--out {out} holds files that are not an itsim export ({', '.join(foreign[:3])}); "
                        "choose a new folder")
    if (out / "export.json").exists() and not overwrite:
        raise UserError(f"--out {out} already holds an export; pass --overwrite to replace it")


def _install(staged: Path, out: Path) -> None:
    """Move the staged files into `out`: export.json goes first out and last in, so a reader never
    sees an export.json describing a mix of old and new graphs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").unlink(missing_ok=True)
    for name in OWNED - {p.name for p in staged.iterdir()}:
        (out / name).unlink(missing_ok=True)
    for path in sorted(staged.iterdir(), key=lambda p: p.name == "export.json"):
        os.replace(path, out / path.name)


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export, verify and write the folder; returns export.json's content with `out` added."""
    if not cfg.model or not cfg.out:
        raise UserError("--model (a model directory, e.g. RUN/model) and --out (a new folder) are required")
    if cfg.format not in SUFFIX:
        raise UserError(f"--format {cfg.format!r}: choose onnx or torchscript")
    # Local folders only (a URL is refused in one line): graphs are exported and run from local files.
    model_dir = Path(storage.require_local(cfg.model, "--model")).resolve()
    out = Path(storage.require_local(cfg.out, "--out"))
    require(cfg.format, cfg.verify)
    model, vocab, pre = load_model(model_dir, "cpu")
    _check_out(out, model_dir, cfg.overwrite)
    specs = graphs(model, pre)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp)
        for graph in specs:
            path = staged / f"{graph.name}{SUFFIX[cfg.format]}"
            try:
                with _quiet():
                    _export_onnx(graph, path, cfg.opset) if cfg.format == "onnx" else _export_torchscript(graph, path)
            except Exception as exc:  # noqa: BLE001 - the exporters raise many types; the user gets one line
                log.debug("export of %s failed", graph.name, exc_info=True)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot export the {graph.name} to {cfg.format}: {first}") from None
        shutil.copyfile(model_dir / "vocab.json", staged / "vocab.json")
        opset = written_opset(staged) if cfg.format == "onnx" else None
        if opset is not None and opset != cfg.opset:
            log.warning("asked for opset %d; the exporter wrote opset %d", cfg.opset, opset)
        checked = verify(staged, cfg.format, model, pre) if cfg.verify else None
        if checked is not None:
            bad = {k: v for k, v in checked.items() if not v <= TOLERANCE}
            if bad:
                raise UserError(f"the exported graphs differ from the model by more than {TOLERANCE}: {bad}; "
                                "nothing written")
        meta = describe(cfg, model_dir, model, pre, vocab.hash, specs, checked, opset)
        (staged / "export.json").write_text(json.dumps(meta, indent=1))
        _install(staged, out)
    log.info("wrote %s", out)
    return {**meta, "out": str(out)}


def _main(args: argparse.Namespace) -> int:
    cfg = config.from_args(ExportConfig, args)
    log.info(config.describe(cfg))
    meta = run(cfg)
    files = ", ".join(g["file"] for g in meta["graphs"].values())
    print(f"itsim export: {files}, vocab.json, export.json -> {meta['out']}")
    if meta["verification"]:
        diffs = meta["verification"]["max_abs_diff"]
        print(f"  checked with {meta['verification']['runtime']}: largest difference "
              f"{max(diffs.values()):.2e} (logit {diffs['logit']:.2e}, probability {diffs['probability']:.2e})")
    return 0


def add_cli(subparsers: Any) -> None:
    config.add_command(subparsers, "export", ExportConfig, _main,
                       help="export a model as ONNX or TorchScript graphs (image encoder, text encoder, head)",
                       description=__doc__.splitlines()[0])
