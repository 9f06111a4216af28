"""The per-rank WebDataset loader and the pair makers, on real shards built from synthetic JPEGs."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, read_split, split_shards
from itsim.data.pairs import balanced_pairs, fixed_balanced_pairs, in_batch_negatives, step_generator


def _spec(shards_dir, **kw) -> StreamSpec:
    shards = split_shards(shards_dir, "train")
    args = dict(shards=shards, batch_size=16, batches_per_epoch=6, seed=0, shuffle_buffer=50)
    args.update(kw)
    return StreamSpec(**args)


def _keys(loader, n):
    return [b["keys"] for b in islice(iter(loader), n)]


def test_batches_are_uint8_images_with_token_ids(tiny_shards):
    batch = next(iter(make_loader(_spec(tiny_shards), workers=0)))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (16, 32, 32, 3)
    assert batch["ids"].dtype == torch.int32 and batch["ids"].shape[:2] == (16, 5)
    assert (batch["lengths"] >= 1).all() and (batch["n_captions"] == 5).all()


def test_same_seed_same_batches_and_other_seed_differs(tiny_shards):
    a = _keys(make_loader(_spec(tiny_shards), workers=0), 8)
    b = _keys(make_loader(_spec(tiny_shards), workers=0), 8)
    c = _keys(make_loader(_spec(tiny_shards, seed=1), workers=0), 8)
    assert a == b and a != c


def test_resume_from_any_batch_with_two_workers_continues_the_same_stream(tiny_shards):
    full = _keys(make_loader(_spec(tiny_shards), workers=2), 14)
    for start in (3, 6, 7):
        resumed = _keys(make_loader(_spec(tiny_shards, start_batch=start), workers=2), 14 - start)
        assert resumed == full[start:], f"resume at batch {start} diverged"


def test_ranks_see_disjoint_images_within_an_epoch(tiny_shards):
    per_rank = []
    for rank in range(2):
        spec = _spec(tiny_shards, rank=rank, world_size=2, batches_per_epoch=2, batch_size=8)
        per_rank.append({k for batch in _keys(make_loader(spec, workers=0), 2) for k in batch})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


@pytest.mark.timeout(60)
def test_fewer_shards_than_ranks_times_workers_resamples_instead_of_hanging(tiny_shards):
    spec = _spec(tiny_shards, shards=split_shards(tiny_shards, "train")[:1], rank=3, world_size=4,
                 batches_per_epoch=4)
    batches = _keys(make_loader(spec, workers=2), 4)
    assert len(batches) == 4 and all(len(b) == 16 for b in batches)


def test_batches_per_epoch_covers_the_images_and_divides_by_workers():
    assert batches_per_epoch(1000, 64, 2, 3) % 3 == 0
    assert batches_per_epoch(1000, 64, 2, 3) * 64 * 2 >= 1000


def test_balanced_pairs_are_about_half_negative_and_never_the_same_image(tiny_shards):
    labels = []
    for step, batch in enumerate(islice(iter(make_loader(_spec(tiny_shards), workers=0)), 30)):
        ids, lengths, label = balanced_pairs(batch, step_generator(0, step, 0))
        for i in range(len(label)):
            own = {tuple(batch["ids"][i, c].tolist()) for c in range(int(batch["n_captions"][i]))}
            assert (tuple(ids[i].tolist()) in own) == bool(label[i])
        labels.append(label)
    rate = torch.cat(labels).mean().item()
    assert 0.42 < rate < 0.58, rate


def test_pairs_are_deterministic_for_seed_step_rank(tiny_shards):
    batch = next(iter(make_loader(_spec(tiny_shards), workers=0)))
    a = balanced_pairs(batch, step_generator(0, 5, 1))
    b = balanced_pairs(batch, step_generator(0, 5, 1))
    c = balanced_pairs(batch, step_generator(0, 5, 0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2]) or not torch.equal(a[0], c[0])


@pytest.mark.parametrize("mode", ["random", "hard"])
def test_in_batch_negatives_skip_same_image_captions(mode):
    key_ids = torch.tensor([7, 7, 8, 9, 10])
    scores = torch.arange(25, dtype=torch.float32).view(5, 5)
    neg = in_batch_negatives(scores, key_ids, 3, mode, step_generator(0, 0, 0))
    assert neg.shape == (5, 3)
    for i in range(5):
        assert all(key_ids[j] != key_ids[i] for j in neg[i].tolist())
    if mode == "hard":  # the highest-scoring wrong captions, in order
        assert neg[2].tolist() == [4, 3, 1]


def test_fixed_eval_pairs_do_not_depend_on_anything_but_the_set():
    caption_image = np.repeat(np.arange(50), 5)
    a = fixed_balanced_pairs(caption_image)
    b = fixed_balanced_pairs(caption_image)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    image_idx, caption_idx, label = a
    assert np.all((image_idx == caption_image[caption_idx]) == (label == 1))
    assert 0.4 < label.mean() < 0.6


def test_read_split_returns_every_val_image(tiny_shards):
    import json

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    samples = read_split(tiny_shards, "val")
    assert len(samples) == manifest["splits"]["val"]["images"]
