"""The matching model (CNN image encoder, packed BiLSTM text encoder, fusion head) and its directory format.

The encoders are separate so evaluation and scoring can encode each image and caption once and run
only the small head over many pairs. A model directory holds only safetensors and JSON: nothing a
user receives is ever unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from itsim.errors import UserError
from itsim.text import PAD_ID, Vocab


@dataclass
class ModelConfig:
    """Sizes of the reference model (about 4.4M parameters with a 20k vocab)."""

    vocab_size: int = 20000
    channels: tuple[int, ...] = (32, 64, 128, 256)
    cnn_dropout: float = 0.2
    image_dim: int = 512
    embed_dim: int = 128
    lstm_hidden: int = 128
    lstm_layers: int = 3
    lstm_dropout: float = 0.2
    text_dim: int = 256
    head_dim: int = 256
    head_dropout: float = 0.3
    # "concat" is the reference head; "concat_product" also feeds the head the element-wise product of
    # the text vector and a projection of the image vector, which makes agreement easy to express.
    fusion: str = "concat"
    channels_last: bool = False


@dataclass
class Preprocess:
    """How inputs were prepared at training time; the scorer must prepare them the same way."""

    image_size: int = 299
    resize: str = "stretch"
    max_len: int = 100


def images_to_float(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as the loader ships them) -> float [B, 3, H, W] in [0, 1] on the same device.

    Images travel as uint8 and are scaled only on the device: 4x less host-to-device traffic.
    """
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


class ImageEncoder(nn.Module):
    """Conv -> BN -> ReLU -> max-pool -> dropout blocks, global average pool, dense to `image_dim`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 3
        for out_ch in cfg.channels:
            blocks += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout2d(cfg.cnn_dropout),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Sequential(nn.Linear(in_ch, cfg.image_dim), nn.ReLU(inplace=True))
        self.channels_last = cfg.channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images_to_float(images, self.channels_last))
        return self.proj(x.mean(dim=(2, 3)))


class TextEncoder(nn.Module):
    """Embedding -> stacked bidirectional LSTM over packed sequences -> `text_dim`.

    Packing means the padding to `max_len` costs nothing. On CPU the LSTM runs in fp32 with
    autocast off: oneDNN has no bf16/fp16 LSTM primitive (it raises under autocast).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True,
                            bidirectional=True, dropout=cfg.lstm_dropout if cfg.lstm_layers > 1 else 0.0)
        out = 2 * cfg.lstm_hidden
        self.proj = nn.Identity() if out == cfg.text_dim else nn.Linear(out, cfg.text_dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        lengths = lengths.long().clamp(min=1, max=ids.shape[1])
        max_len = int(lengths.max())
        emb = self.embed(ids[:, :max_len])
        on_cpu = emb.device.type == "cpu"
        with torch.autocast(device_type=emb.device.type, enabled=not on_cpu and torch.is_autocast_enabled(emb.device.type)):
            if on_cpu:
                emb = emb.float()
            packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.lstm(packed)
        last = torch.cat([h_n[-2], h_n[-1]], dim=1)  # final forward and backward states of the top layer
        return self.proj(last)


class FusionHead(nn.Module):
    """concat(image, text[, proj(image) * text]) -> dense -> BN -> ReLU -> dropout -> dense -> one logit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.fusion not in ("concat", "concat_product"):
            raise ValueError(f"unknown fusion {cfg.fusion!r} (concat | concat_product)")
        self.product = nn.Linear(cfg.image_dim, cfg.text_dim) if cfg.fusion == "concat_product" else None
        extra = cfg.text_dim if self.product is not None else 0
        self.net = nn.Sequential(
            nn.Linear(cfg.image_dim + cfg.text_dim + extra, cfg.head_dim),
            nn.BatchNorm1d(cfg.head_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.head_dropout),
            nn.Linear(cfg.head_dim, 1),
        )

    def forward(self, image_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        text_vec = text_vec.to(image_vec.dtype)
        parts = [image_vec, text_vec]
        if self.product is not None:
            parts.append(self.product(image_vec) * text_vec)
        return self.net(torch.cat(parts, dim=1)).squeeze(1)


class ItsimModel(nn.Module):
    """Scores image-caption pairs; `forward` returns logits (apply sigmoid for probabilities)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion = FusionHead(cfg)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids, lengths)

    def head(self, image_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        return self.fusion(image_vec, text_vec)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for pairs (image_index[p], text_index[p]); without indices, image i with caption i.

        Encoding each image and caption once and indexing the vectors is what lets one CNN pass serve
        many pairs. Training goes through `forward` (not the encoders directly) so DDP sees the call.
        """
        image_vec = self.encode_image(images)
        text_vec = self.encode_text(ids, lengths)
        if image_index is not None:
            image_vec = image_vec[image_index]
        if text_index is not None:
            text_vec = text_vec[text_index]
        return self.head(image_vec, text_vec)

    def score_matrix(self, image_vec: torch.Tensor, text_vec: torch.Tensor, max_elements: int = 1 << 20) -> torch.Tensor:
        """Logits for every image x every caption [n_img, n_txt], running only the head (see score_all_pairs)."""
        return score_all_pairs(self, image_vec, text_vec, max_elements)


@torch.no_grad()
def encode_images(model: ItsimModel, images: "np.ndarray | torch.Tensor", device: torch.device,
                  batch_size: int = 256) -> torch.Tensor:
    """uint8 [N,H,W,3] -> image vectors [N, D] on `device`, in batches (eval mode is the caller's job)."""
    images = torch.as_tensor(images)
    out = [model.encode_image(images[i:i + batch_size].to(device, non_blocking=True))
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).float() if out else torch.zeros((0, model.cfg.image_dim), device=device)


@torch.no_grad()
def encode_captions(model: ItsimModel, ids: "np.ndarray | torch.Tensor", lengths: "np.ndarray | torch.Tensor",
                    device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """ids [N, L] + lengths [N] -> caption vectors [N, D] on `device`, in batches."""
    ids, lengths = torch.as_tensor(ids), torch.as_tensor(lengths)
    out = [model.encode_text(ids[i:i + batch_size].to(device), lengths[i:i + batch_size].to(device))
           for i in range(0, ids.shape[0], batch_size)]
    return torch.cat(out).float() if out else torch.zeros((0, model.cfg.text_dim), device=device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _foldable_head(model: "ItsimModel") -> tuple[Any, Any, Any] | None:
    """(linear1, batchnorm, linear2) when the head is the reference MLP in eval mode, else None."""
    net = getattr(getattr(model, "fusion", None), "net", None)
    if model.training or not isinstance(net, nn.Sequential) or len(net) != 5:
        return None
    lin1, bn, act, drop, lin2 = net
    kinds = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear)
    if not all(isinstance(m, k) for m, k in zip(net, kinds)) or lin2.out_features != 1 or bn.running_var is None:
        return None
    return lin1, bn, lin2


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run thousands of small memory-bound ops on one thread: fork/join costs more than it saves.

    Measured on 2 shared cores (1,000 x 5,000 pairs): 0.6-0.9 s on one thread, 15-30 s on two
    when other processes compete for the cores.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def score_all_pairs(model: "ItsimModel", image_vecs: torch.Tensor, caption_vecs: torch.Tensor,
                    max_elements: int = 1 << 20) -> torch.Tensor:
    """Head logits for every image x every caption, [n_images, n_captions] float32.

    The reference head is linear up to its ReLU, so its first layer splits into an image part and a
    caption part computed once each, with the eval-mode BatchNorm folded in; each pair then costs
    one add, a ReLU and a dot product instead of a 768x256 matmul. Other heads fall back to calling
    `model.head` on repeated vectors. Either way work proceeds in chunks of about `max_elements`.
    """
    n_img, n_cap = image_vecs.shape[0], caption_vecs.shape[0]
    parts = _foldable_head(model)
    out = torch.empty((n_img, n_cap), dtype=torch.float32, device=image_vecs.device)
    if parts is None:
        rows = max(1, max_elements // max(1, n_cap * (image_vecs.shape[1] + caption_vecs.shape[1])))
        for lo in range(0, n_img, rows):
            img = image_vecs[lo:lo + rows]
            logits = model.head(img.repeat_interleave(n_cap, dim=0), caption_vecs.repeat(img.shape[0], 1))
            out[lo:lo + img.shape[0]] = logits.float().view(img.shape[0], n_cap)
        return out
    lin1, bn, lin2 = parts
    d_img, d_txt = image_vecs.shape[1], caption_vecs.shape[1]
    weight = lin1.weight.float()
    scale = bn.running_var.float().add(bn.eps).rsqrt()
    shift = -bn.running_mean.float() * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.float(), shift * bn.weight.float() + bn.bias.float()
    img_part = (image_vecs.float() @ weight[:, :d_img].T) * scale  # [n_img, H]
    cap_part = (caption_vecs.float() @ weight[:, d_img:d_img + d_txt].T + lin1.bias.float()) * scale + shift
    w2, b2 = lin2.weight.float()[0], lin2.bias.float()[0]
    product = getattr(model.fusion, "product", None)
    if product is not None:  # concat_product: a bilinear term per pair, one batched matmul per image chunk
        q = product(image_vecs.float())  # [n_img, d_txt]
        w_prod = weight[:, d_img + d_txt:] * scale[:, None]  # [H, d_txt], BatchNorm scale folded in
        caps_t = caption_vecs.float().T  # [d_txt, n_cap]
        step = max(1, max_elements * 4 // max(1, n_cap * w_prod.shape[0]))
        for i in range(0, n_img, step):
            bilinear = (q[i:i + step, None, :] * w_prod[None]) @ caps_t  # [n, H, n_cap]
            h = (bilinear + img_part[i:i + step, :, None] + cap_part.T[None]).clamp_min_(0.0)
            out[i:i + h.shape[0]] = torch.einsum("nhc,h->nc", h, w2) + b2
        return out
    hidden = img_part.shape[1]
    cap_step = max(1, min(n_cap, max_elements // hidden))
    img_step = max(1, min(n_img, max_elements // (cap_step * hidden)))
    buffer = torch.empty((img_step, cap_step, hidden), dtype=torch.float32, device=out.device)
    with _one_cpu_thread(out.device):
        for i in range(0, n_img, img_step):
            rows = img_part[i:i + img_step, None, :]
            for c in range(0, n_cap, cap_step):
                cols = cap_part[None, c:c + cap_step, :]
                h = buffer[:rows.shape[0], :cols.shape[1]]
                torch.add(rows, cols, out=h).clamp_min_(0.0)  # ReLU
                logits = torch.mv(h.reshape(-1, hidden), w2).view(h.shape[:2]) + b2
                out[i:i + rows.shape[0], c:c + cols.shape[1]] = logits
    return out


# --- model directory: model.safetensors + config.json + vocab.json --------------------------------

def _config_dict(cfg: ModelConfig, pre: Preprocess, extra: dict[str, Any] | None) -> dict[str, Any]:
    from itsim import __version__

    return {"format": "itsim-model", "format_version": 1, "itsim_version": __version__,
            "model": dataclasses.asdict(cfg), "preprocess": dataclasses.asdict(pre), **(extra or {})}


def save_model(directory: str | Path, model: ItsimModel, vocab: Vocab, pre: Preprocess,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the model directory atomically enough for readers: files land under temp names first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
    (directory / "model.safetensors.tmp").replace(directory / "model.safetensors")
    vocab.save(directory / "vocab.json")
    (directory / "config.json").write_text(json.dumps(_config_dict(model.cfg, pre, extra), indent=2))
    return directory


def _dataclass_from(cls: type, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ItsimModel, Vocab, Preprocess]:
    """Model (eval mode, on `device`), its vocab, and the preprocessing it was trained with."""
    directory = Path(directory)
    missing = [n for n in ("model.safetensors", "config.json", "vocab.json") if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory} is not an itsim model directory (missing {', '.join(missing)})")
    config = json.loads((directory / "config.json").read_text())
    cfg = _dataclass_from(ModelConfig, config.get("model", {}))
    pre = _dataclass_from(Preprocess, config.get("preprocess", {}))
    vocab = Vocab.load(directory / "vocab.json")
    if len(vocab) != cfg.vocab_size:
        raise UserError(f"{directory}: vocab.json has {len(vocab)} words but the model expects {cfg.vocab_size}")
    model = ItsimModel(cfg)
    try:
        model.load_state_dict(load_file(str(directory / "model.safetensors"), device="cpu"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{directory / 'model.safetensors'}: cannot load weights ({exc})") from None
    return model.to(device).eval(), vocab, pre


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
