"""The per-rank WebDataset loader and the pair makers, on real shards built from synthetic JPEGs."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from itsim.data.loader import StreamSpec, batches_per_epoch, make_loader, read_split, split_shards
from itsim.data.pairs import (balanced_pairs, fixed_balanced_pairs, in_batch_negatives, in_batch_pairs, step_captions,
                              step_generator)


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


@pytest.mark.parametrize("images,batch,ranks,workers", [
    (6000, 256, 8, 8), (7316, 256, 8, 8), (7316, 256, 1, 8), (1000, 64, 2, 3), (29000, 128, 16, 12), (100, 256, 1, 4),
    (240, 16, 1, 2)])
def test_an_epoch_is_one_pass_within_one_batch_per_rank(images, batch, ranks, workers):
    """Not rounded up to the workers: 6,000 images on 8 GPUs x 8 workers was 8 batches per rank (2.7 passes)."""
    bpe = batches_per_epoch(images, batch, ranks, workers)
    seen = bpe * batch * ranks
    assert images <= seen < images + batch * ranks or (bpe == 1 and images < batch * ranks)
    assert seen / images < 1 + batch * ranks / images


def test_workers_own_every_batch_index_exactly_once_across_epochs():
    from itsim.data.loader import owned_batches

    for per_epoch, workers in [(5, 2), (3, 8), (7, 3), (8, 8)]:
        made = sorted(g for e in range(6) for w in range(workers) for g in owned_batches(e, w, workers, per_epoch))
        assert made == list(range(6 * per_epoch)), (per_epoch, workers)


@pytest.mark.parametrize("per_epoch,workers", [(5, 2), (4, 3)])
def test_resume_with_epochs_not_a_multiple_of_the_workers_continues_the_same_stream(tiny_shards, per_epoch, workers):
    full = _keys(make_loader(_spec(tiny_shards, batches_per_epoch=per_epoch), workers=workers), 2 * per_epoch + 2)
    for start in (1, per_epoch + 1):
        resumed = _keys(make_loader(_spec(tiny_shards, batches_per_epoch=per_epoch, start_batch=start),
                                    workers=workers), 2 * per_epoch + 2 - start)
        assert resumed == full[start:], f"resume at batch {start} diverged"


def _own_captions(batch, i):
    return {tuple(batch["ids"][i, c].tolist()) for c in range(int(batch["n_captions"][i]))}


def test_step_captions_take_every_caption_by_default_or_n_distinct_ones(tiny_shards):
    batch = next(iter(make_loader(_spec(tiny_shards), workers=0)))
    every = step_captions(batch, 0, step_generator(0, 0, 0))
    assert every.ids.shape[0] == int(batch["n_captions"].sum()) == 16 * 5
    assert torch.equal(every.image, torch.arange(16).repeat_interleave(5))
    two = step_captions(batch, 2, step_generator(0, 0, 0))
    assert torch.equal(two.image, torch.arange(16).repeat_interleave(2))
    for i in range(16):
        picked = [tuple(row.tolist()) for row in two.ids[two.image == i]]
        assert set(picked) <= _own_captions(batch, i) and len(picked) == 2


def test_balanced_pairs_cover_every_caption_about_half_negative_never_the_same_image(tiny_shards):
    labels = []
    for step, batch in enumerate(islice(iter(make_loader(_spec(tiny_shards), workers=0)), 30)):
        gen = step_generator(0, step, 0)
        caps = step_captions(batch, 0, gen)
        pairs = balanced_pairs(caps, batch["key_ids"], gen)
        assert len(pairs) == caps.ids.shape[0] and torch.equal(pairs.image_index, caps.image)
        assert abs(pairs.weights.sum().item() - 1.0) < 1e-5
        keys = batch["key_ids"]
        positive = pairs.labels == 1
        assert torch.equal(pairs.text_index[positive], torch.arange(len(pairs))[positive])
        negative_owner = keys[caps.image[pairs.text_index[~positive]]]
        assert (negative_owner != keys[pairs.image_index[~positive]]).all()
        labels.append(pairs.labels)
    rate = torch.cat(labels).mean().item()
    assert 0.46 < rate < 0.54, rate


def test_balanced_pairs_statistics_half_negative_other_image_uniform_its_captions_uniform():
    """The O(n) draw keeps the reference's statistics: P(negative) = 0.5; the other image uniform among
    the batch's other distinct images (a repeated image, same key, is not "other"); within it every
    caption equally likely, whatever the caption counts. Tolerances: 5 standard deviations."""
    from itsim.data.pairs import StepCaptions

    key_ids = torch.tensor([10, 11, 12, 10, 13])  # row 3 repeats row 0's image
    n_caps = [2, 1, 3, 4, 5]
    image = torch.cat([torch.full((c,), i) for i, c in enumerate(n_caps)])
    n = len(image)
    caps = StepCaptions(torch.zeros(n, 3, dtype=torch.int32), torch.ones(n, dtype=torch.int32), image)
    caption_key = key_ids[image]
    negative = torch.zeros(n)
    drawn = torch.zeros(n, n)  # [caption, caption whose text it was given as a negative]
    steps = 4000
    for step in range(steps):
        pairs = balanced_pairs(caps, key_ids, step_generator(0, step, 0))
        neg = pairs.labels == 0
        assert (caption_key[pairs.text_index[neg]] != caption_key[neg]).all()
        negative += neg.float()
        drawn[torch.nonzero(neg).flatten(), pairs.text_index[neg]] += 1

    def close(count: float, total: float, p: float) -> bool:
        return abs(count / total - p) <= 5 * (p * (1 - p) / total) ** 0.5

    assert close(float(negative.sum()), steps * n, 0.5)
    keys = sorted(set(key_ids.tolist()))
    for own in keys:
        mine = caption_key == own
        per_key = {k: float(drawn[mine][:, caption_key == k].sum()) for k in keys}
        assert per_key[own] == 0
        total = sum(per_key.values())
        assert all(close(per_key[k], total, 1 / 3) for k in keys if k != own), (own, per_key)
    for key in keys:  # the captions of one image equally likely (image 10's span two batch rows)
        given = drawn[:, caption_key == key].sum(dim=0)
        assert all(close(float(g), float(given.sum()), 1 / len(given)) for g in given), (key, given)


def test_pairs_are_deterministic_for_seed_step_rank(tiny_shards):
    batch = next(iter(make_loader(_spec(tiny_shards), workers=0)))

    def draw(step, rank):
        gen = step_generator(0, step, rank)
        return balanced_pairs(step_captions(batch, 2, gen), batch["key_ids"], gen)

    a, b, c = draw(5, 1), draw(5, 1), draw(5, 0)
    assert torch.equal(a.text_index, b.text_index) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels) or not torch.equal(a.text_index, c.text_index)


@pytest.mark.parametrize("mode", ["random", "hard"])
def test_in_batch_negatives_skip_same_image_captions(mode):
    key_ids = torch.tensor([7, 7, 8, 9, 10])
    valid = key_ids[:, None] != key_ids[None, :]
    scores = torch.arange(25, dtype=torch.float32).view(5, 5)
    neg, usable = in_batch_negatives(scores, valid, 3, mode, step_generator(0, 0, 0))
    assert neg.shape == (5, 3) and usable.all()
    for i in range(5):
        assert all(key_ids[j] != key_ids[i] for j in neg[i].tolist())
    if mode == "hard":  # the highest-scoring wrong captions, in order
        assert neg[2].tolist() == [4, 3, 1]


def test_in_batch_pairs_positives_are_every_caption_negatives_k_per_image_half_the_weight_each(tiny_shards):
    batch = next(iter(make_loader(_spec(tiny_shards), workers=0)))
    gen = step_generator(0, 0, 0)
    caps = step_captions(batch, 0, gen)
    pairs = in_batch_pairs(caps, batch["key_ids"], 7, "random", gen)
    n = caps.ids.shape[0]
    assert len(pairs) == n + 16 * 7
    positive = pairs.labels == 1
    assert int(positive.sum()) == n and torch.equal(pairs.text_index[positive], torch.arange(n))
    assert abs(pairs.weights[positive].sum().item() - 0.5) < 1e-5
    assert abs(pairs.weights[~positive].sum().item() - 0.5) < 1e-5
    keys = batch["key_ids"]
    assert (keys[pairs.image_index[~positive]] != keys[caps.image[pairs.text_index[~positive]]]).all()


def test_a_batch_of_one_image_has_no_usable_negatives_and_keeps_only_positives():
    batch = {"ids": torch.ones(2, 5, 4, dtype=torch.int32), "lengths": torch.full((2, 5), 4),
             "n_captions": torch.tensor([5, 3]), "key_ids": torch.tensor([1, 1])}
    gen = step_generator(0, 0, 0)
    caps = step_captions(batch, 0, gen)
    assert caps.ids.shape[0] == 8
    assert balanced_pairs(caps, batch["key_ids"], gen).labels.eq(1).all()
    pairs = in_batch_pairs(caps, batch["key_ids"], 3, "random", gen)
    assert len(pairs) == 8 and pairs.weights[pairs.labels == 0].eq(0).all()


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


def test_loader_prefetch_fits_the_shared_memory_or_names_the_shm_size_needed(caplog):
    from itsim.data.loader import SHM, batch_nbytes, plan_prefetch, shm_free
    from itsim.errors import UserError

    batch = batch_nbytes(256, 299, 5, 100)
    assert 68e6 < batch < 70e6  # the "69 MB uint8 batch", plus its token ids
    gb = 10**9
    # 8 ranks x 12 workers in a container's default 64 MB: refused before any worker starts, with the fix
    with pytest.raises(UserError, match=r"--shm-size=\d+g or --ipc=host"):
        plan_prefetch(batch, 12, 8, 64 * 2**20)
    assert plan_prefetch(batch, 12, 8, 1000 * gb) == 4  # --ipc=host on a big node: the full prefetch
    assert plan_prefetch(batch, 8, 8, 21 * gb) == 4  # (8 x 4 + 2) x 69 MB x 8 ranks = 18.8 GB fits 21 x 0.9
    assert plan_prefetch(batch, 8, 8, 20 * gb) == 3  # ... but not 20 x 0.9
    with caplog.at_level("WARNING"):
        assert plan_prefetch(batch, 8, 8, 12 * gb) == 2  # lowered, with a warning
    assert "prefetch lowered from 4 to 2" in caplog.text
    assert plan_prefetch(batch, 0, 8, 0) == 4  # no workers: batches never cross shared memory
    assert plan_prefetch(batch, 8, 8, None) == 4  # no /dev/shm on this system: nothing to size
    free = shm_free()
    assert free is None or (free > 0 and SHM == "/dev/shm")
