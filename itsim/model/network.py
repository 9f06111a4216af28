"""The matching model: CNN image encoder, packed BiLSTM text encoder, fusion head.

The encoders are separate so evaluation and scoring can encode each image and caption once and run
only the small head over many pairs (see encode.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itsim.model.encode import score_all_pairs
from itsim.text import PAD_ID


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
    # The caption vector: "last" (reference) = the top layer's final forward and backward states,
    # "mean"/"max" = pooled over every position's top-layer outputs.
    text_pool: str = "last"
    # > 0: both vectors are also projected to this shared size and L2-normalised for a contrastive
    # (ITC) objective with a learnable temperature; 0 (reference) = no such projections.
    contrastive_dim: int = 0


def images_to_float(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as the loader ships them) -> float [B, 3, H, W] in [0, 1] on the same device,
    in an explicit memory format: channels_last when asked, else contiguous NCHW.

    Images travel as uint8 and are scaled only on the device: 4x less host-to-device traffic. The
    permuted NHWC view already has channels-last strides, and `.float()` would keep them, so without
    the explicit format "channels_last off" would silently still be channels-last.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).to(torch.float32, memory_format=fmt).div_(255.0)
    return images.contiguous(memory_format=fmt)


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


def host_lengths(lengths: "torch.Tensor | np.ndarray | list[int]", max_len: int) -> torch.Tensor:
    """Caption lengths as an int64 CPU tensor clamped to [1, max_len].

    Packing needs them on the host. Pass a NumPy array (or a CPU tensor) from the host: DDP moves
    every tensor argument of `forward` to the GPU with a blocking copy, but leaves arrays alone; a
    device tensor costs one device-to-host sync here.
    """
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.cpu()
    return torch.as_tensor(lengths).long().clamp(min=1, max=max_len)


class TextEncoder(nn.Module):
    """Embedding -> stacked bidirectional LSTM over packed sequences -> `text_dim`.

    Packing means the padding to `max_len` costs nothing. The LSTM runs in fp32 with autocast off on
    every device, one code path: oneDNN has no bf16/fp16 LSTM (it raises under CPU autocast), and
    cuDNN's autocast RNN path may cast to fp16 whatever the autocast dtype, where without a
    GradScaler (bf16 runs have none) the text branch's small gradients can underflow. The LSTM is
    about 1% of the model's FLOPs. The sequences are sorted on the host and the permutations copied
    without blocking, so nothing here waits for the GPU.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True,
                            bidirectional=True, dropout=cfg.lstm_dropout if cfg.lstm_layers > 1 else 0.0)
        out = 2 * cfg.lstm_hidden
        self.proj = nn.Identity() if out == cfg.text_dim else nn.Linear(out, cfg.text_dim)
        if cfg.text_pool not in ("last", "mean", "max"):
            raise ValueError(f"unknown text_pool {cfg.text_pool!r} (last | mean | max)")
        self.pool = cfg.text_pool

    def forward(self, ids: torch.Tensor, lengths: "torch.Tensor | np.ndarray") -> torch.Tensor:
        lengths = host_lengths(lengths, ids.shape[1])
        order = torch.argsort(lengths, descending=True, stable=True)  # longest first, as packing wants
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        sorted_lengths = lengths[order]
        device = ids.device
        order, inverse = order.to(device, non_blocking=True), inverse.to(device, non_blocking=True)
        emb = self.embed(ids[:, :int(sorted_lengths[0])].long().index_select(0, order))
        with torch.autocast(device_type=device.type, enabled=False):
            packed = pack_padded_sequence(emb.float(), sorted_lengths, batch_first=True, enforce_sorted=True)
            outputs, (h_n, _) = self.lstm(packed)
            if self.pool == "last":
                vec = torch.cat([h_n[-2], h_n[-1]], dim=1)  # final states of the top layer, both directions
            else:
                vec = pool_outputs(pad_packed_sequence(outputs, batch_first=True)[0], sorted_lengths, self.pool)
        return self.proj(vec.index_select(0, inverse))


def pool_outputs(outputs: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean or max over the valid positions of [B, L, D] outputs (positions >= length ignored)."""
    valid = (torch.arange(outputs.shape[1], device=outputs.device)[None, :] < lengths.to(outputs.device)[:, None])
    valid = valid.unsqueeze(2)
    if mode == "max":
        return outputs.masked_fill(~valid, float("-inf")).amax(dim=1)
    return (outputs * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


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
        if cfg.contrastive_dim > 0:
            self.image_embed = nn.Linear(cfg.image_dim, cfg.contrastive_dim)
            self.text_embed = nn.Linear(cfg.text_dim, cfg.contrastive_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def similarity(self, image_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        """Contrastive logits [n_img, n_txt]: temperature-scaled cosine of the projected vectors (needs
        contrastive_dim > 0). The scale exp(logit_scale) is capped at 100 as in CLIP."""
        img = nn.functional.normalize(self.image_embed(image_vec.float()), dim=1)
        txt = nn.functional.normalize(self.text_embed(text_vec.float()), dim=1)
        return self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids, lengths)

    def head(self, image_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        """Logits of encoded pairs, in fp32 with autocast off on every device: the scoring and
        evaluation path. Under bf16 autocast the logits would carry 8 mantissa bits, so `--mode topk`
        would meet exact ties and GPU rankings would differ from CPU ones and from `itsim eval`.
        (Training's `forward` runs the head under the caller's autocast: there it is a speed choice.)
        """
        with torch.autocast(device_type=image_vec.device.type, enabled=False):
            return self.fusion(image_vec.float(), text_vec.float())

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None, text_index: torch.Tensor | None = None,
                select: Any = None) -> Any:
        """Logits for pairs (image_index[p], text_index[p]); without indices, image i with caption i.

        Encoding each image and caption once and indexing the vectors is what lets one CNN pass serve
        many pairs. Training goes through `forward` (not the encoders directly) so DDP sees the call.
        With `select` (contrastive models): the similarity matrix [B, N] is computed first, the pairs
        come from `select(similarity.detach())` -> (image_index, text_index), and the result is
        (logits, similarity), all in this one call.
        `lengths` is best a NumPy array (see `host_lengths`). The head runs under the caller's autocast
        here (in-batch hard negatives put B x N pairs through it); `head` is the fp32 scoring path.
        """
        image_vec = self.encode_image(images)
        text_vec = self.encode_text(ids, lengths)
        if select is not None:
            sim = self.similarity(image_vec, text_vec)
            image_index, text_index = select(sim.detach())
            return self.head(image_vec[image_index], text_vec[text_index]), sim
        if image_index is not None:
            image_vec = image_vec[image_index]
        if text_index is not None:
            text_vec = text_vec[text_index]
        return self.fusion(image_vec, text_vec)

    def score_matrix(self, image_vec: torch.Tensor, text_vec: torch.Tensor, max_elements: int = 1 << 20) -> torch.Tensor:
        """Logits for every image x every caption [n_img, n_txt], running only the head (see score_all_pairs)."""
        return score_all_pairs(self, image_vec, text_vec, max_elements)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

