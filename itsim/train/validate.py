"""Validation during training: balanced pairs with fixed, seeded negatives.

The pairs depend only on the val split and a constant seed, never on the run's seed or the model, so
`val_accuracy` is comparable across runs and models. Images and captions are encoded once and only the
fusion head runs per pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from itsim.data.loader import read_split
from itsim.data.pairs import fixed_balanced_pairs
from itsim.eval.metrics import retrieval_metrics, roc_auc
from itsim.model import ItsimModel, encode_captions, encode_images

EVAL_PAIR_SEED = 0


@dataclass
class ValidationSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    ids: np.ndarray  # int32 [C, L], every caption of every image
    lengths: np.ndarray  # int32 [C]
    caption_image: np.ndarray  # image index of each caption [C]
    keys: list[str]

    @classmethod
    def from_samples(cls, samples: list[dict]) -> "ValidationSet":
        ids = [s["ids"] for s in samples]
        return cls(
            images=np.stack([s["image"] for s in samples]) if samples else np.zeros((0, 1, 1, 3), np.uint8),
            ids=np.concatenate(ids) if ids else np.zeros((0, 1), np.int32),
            lengths=np.concatenate([s["lengths"] for s in samples]) if ids else np.zeros(0, np.int32),
            caption_image=np.concatenate([np.full(len(x), i) for i, x in enumerate(ids)]) if ids else np.zeros(0, int),
            keys=[s["key"] for s in samples],
        )

    @classmethod
    def from_shards(cls, shard_dir: str | Path, split: str = "val", max_images: int | None = 1000,
                    options: Mapping[str, Any] | None = None) -> "ValidationSet":
        return cls.from_samples(read_split(shard_dir, split, max_images=max_images, options=options))

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return fixed_balanced_pairs(self.caption_image, seed=EVAL_PAIR_SEED)

    @torch.no_grad()
    def pair_logits(self, model: ItsimModel, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of the fixed balanced pairs."""
        image_idx, caption_idx, labels = self.pairs()
        image_vec = encode_images(model, self.images, device)
        text_vec = encode_captions(model, self.ids, self.lengths, device)
        self._vectors = (image_vec, text_vec)
        logits = torch.cat([
            model.head(image_vec[image_idx[i:i + 4096]], text_vec[caption_idx[i:i + 4096]]).float()
            for i in range(0, len(labels), 4096)
        ]) if len(labels) else torch.zeros(0)
        return logits.cpu().numpy(), labels

    def evaluate(self, model: ItsimModel, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            logits, labels = self.pair_logits(model, device)
        finally:
            model.train(was_training)
        if len(labels) == 0:
            return {}
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels).float())
        result = {"val_loss": float(loss), "val_accuracy": float(((logits > 0) == (labels == 1)).mean()),
                  "val_roc_auc": float(roc_auc(logits, labels)), "val_pairs": int(len(labels))}
        if getattr(model.cfg, "contrastive_dim", 0) > 0:  # retrieval by the contrastive vectors: one matmul
            with torch.no_grad():
                sim = model.similarity(*self._vectors).float().cpu()
            ranks = retrieval_metrics(sim, self.caption_image)
            result.update({f"val_itc_{k}": float(ranks[k]) for k in ("i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10")})
        return result
