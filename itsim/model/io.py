"""The model directory: model.safetensors + config.json + vocab.json, and nothing a user receives is unpickled."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from itsim import __version__, storage, storage_stream
from itsim.errors import UserError
from itsim.storage_errors import NotFound
from itsim.io import atomic_write
from itsim.model.network import ItsimModel, ModelConfig
from itsim.text import Vocab

MODEL_FILES = ("model.safetensors", "config.json", "vocab.json")


@dataclass
class Preprocess:
    """How inputs were prepared at training time; the scorer must prepare them the same way."""

    image_size: int = 299
    resize: str = "stretch"
    max_len: int = 100


def _config_dict(cfg: ModelConfig, pre: Preprocess, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": "itsim-model", "format_version": 1, "itsim_version": __version__,
            "model": dataclasses.asdict(cfg), "preprocess": dataclasses.asdict(pre), **(extra or {})}


def save_model(directory: str | Path, model: ItsimModel, vocab: Vocab, pre: Preprocess,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the model directory; each file lands whole (temp name, then rename), so a reader never sees a torn one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    vocab.save(directory / "vocab.json")
    atomic_write(directory / "config.json", json.dumps(_config_dict(model.cfg, pre, extra), indent=2))
    return directory


def _dataclass_from(cls: type, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               options: Mapping[str, Any] | None = None) -> tuple[ItsimModel, Vocab, Preprocess]:
    """Model (eval mode, on `device`), its vocab, and the preprocessing it was trained with.

    `directory` may be a store URL (`s3://bucket/run/model`, `options`: storage options): its three
    files are downloaded into a temp folder and loaded from there, so a remote model passes the same
    checks and gives the same numbers as a local one. Named files rather than the whole prefix: only
    read access to those objects is needed, and nothing else stored beside them (an export) is fetched.
    """
    text = os.fspath(directory)
    if storage.is_url(text) and storage.resolve(text, options).fs is not None:
        with tempfile.TemporaryDirectory(prefix="itsim-model-") as tmp:
            missing = []
            for name in MODEL_FILES:
                try:
                    storage_stream.download(storage.join(text, name), os.path.join(tmp, name), options)
                except NotFound:
                    missing.append(name)
            return _load_local(Path(tmp), device, text, missing)
    directory = Path(storage.resolve(text).path)
    return _load_local(directory, device, str(directory), [n for n in MODEL_FILES if not (directory / n).is_file()])


def _load_local(directory: Path, device: str | torch.device, where: str,
                missing: list[str]) -> tuple[ItsimModel, Vocab, Preprocess]:
    """Load a model folder; `where` names it in messages (the URL of a downloaded one)."""
    if missing:
        raise UserError(f"{where} is not an itsim model directory (missing {', '.join(missing)})")
    config = json.loads((directory / "config.json").read_text())
    cfg = _dataclass_from(ModelConfig, config.get("model", {}))
    pre = _dataclass_from(Preprocess, config.get("preprocess", {}))
    vocab = Vocab.load(directory / "vocab.json")
    if len(vocab) != cfg.vocab_size:
        raise UserError(f"{where}: vocab.json has {len(vocab)} words but the model expects {cfg.vocab_size}")
    model = ItsimModel(cfg)
    try:
        model.load_state_dict(load_file(str(directory / "model.safetensors"), device="cpu"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{where}/model.safetensors: cannot load weights ({exc})") from None
    return model.to(device).eval(), vocab, pre


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
