"""Encode once, score many: batched image/caption encoding and the head over every pair.

Every stage that needs vectors (validation, `itsim eval`, the Scorer, the Ray job, top-k) calls
`encode_images`/`encode_captions`, so a model is run the same way (batches, device transfer,
autocast) wherever it is evaluated.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from itsim.model.network import ItsimModel


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for the encoders; fp32 on CPU (CPU bf16 convolutions are ~10x slower).
    The LSTM and the head turn it off for themselves (fp32 on every device)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(array: "np.ndarray | torch.Tensor", device: torch.device) -> torch.Tensor:
    """Host array -> tensor on `device`; pinned and asynchronous on CUDA."""
    tensor = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def rows_to_device(array: "np.ndarray | torch.Tensor", rows: "np.ndarray | torch.Tensor",
                   device: torch.device) -> torch.Tensor:
    """`array[rows]` on `device` with one host copy: on CUDA the rows are gathered straight into pinned
    memory (torch's index_select, spread over the torch threads) and copied without blocking. A 299 px
    row is 268 KB, and numpy's gather, `pin_memory()` and the transfer were three copies of it."""
    if isinstance(array, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays straight from Arrow blocks: only read here
            warnings.simplefilter("ignore", UserWarning)
            array = torch.from_numpy(array)
    index = torch.as_tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return array.index_select(0, index).to(device)
    out = torch.empty((index.numel(), *array.shape[1:]), dtype=array.dtype, pin_memory=True)
    return torch.index_select(array, 0, index, out=out).to(device, non_blocking=True)


@torch.inference_mode()
def encode_images(model: "ItsimModel", images: "np.ndarray | torch.Tensor", device: torch.device,
                  batch_size: int = 256) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float32 image vectors [N, D] on `device`, in batches (eval mode is the caller's job)."""
    with autocast(device):
        out = [model.encode_image(to_device(images[i:i + batch_size], device)).float()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.cfg.image_dim), device=device)


@torch.inference_mode()
def encode_captions(model: "ItsimModel", ids: "np.ndarray | torch.Tensor", lengths: "np.ndarray | torch.Tensor",
                    device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """ids [N, L] + lengths [N] -> float32 caption vectors [N, D] on `device`, in batches.

    Lengths stay on the host: packing the sequences needs them there.
    """
    lengths = torch.as_tensor(lengths)
    with autocast(device):
        out = [model.encode_text(to_device(ids[i:i + batch_size], device), lengths[i:i + batch_size]).float()
               for i in range(0, len(ids), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.cfg.text_dim), device=device)


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
    The head runs in fp32 with autocast off whatever the caller's autocast (the CNN may be bf16): bf16
    logits tie, and rankings would then differ between devices and from `itsim eval`.
    """
    with torch.autocast(device_type=image_vecs.device.type, enabled=False):
        return _score_all_pairs_fp32(model, image_vecs.float(), caption_vecs.float(), max_elements)


def _score_all_pairs_fp32(model: "ItsimModel", image_vecs: torch.Tensor, caption_vecs: torch.Tensor,
                          max_elements: int) -> torch.Tensor:
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

