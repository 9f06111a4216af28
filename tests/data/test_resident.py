"""--data-on-device: the split decoded once, batches gathered in memory, a pure function of (seed, step, rank)."""
from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from itsim.data.loader import batches_per_epoch, make_loader, StreamSpec, split_shards
from itsim.data.resident import ResidentBatches, check_fits, load_split, memory_budget
from itsim.errors import UserError


@pytest.fixture(scope="module")
def split(tiny_shards):
    n = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["train"]["images"]
    return load_split(tiny_shards, "train", n, 32, torch.device("cpu"), threads=2)


def test_the_split_is_decoded_once_with_every_image_and_its_captions(tiny_shards, split):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["train"]
    assert len(split) == manifest["images"] and split.skipped == 0
    assert split.images.dtype == torch.uint8 and split.images.shape == (len(split), 32, 32, 3)
    assert int(split.n_captions.sum()) == manifest["captions"]
    assert len(set(split.keys)) == len(split)


def test_batches_have_the_streaming_loaders_format(tiny_shards, split):
    streamed = next(iter(make_loader(StreamSpec(split_shards(tiny_shards, "train"), 16, 6), workers=0)))
    resident = next(iter(ResidentBatches(split, 16, 6)))
    assert set(resident) == set(streamed)
    for key, value in streamed.items():
        if isinstance(value, torch.Tensor):
            assert resident[key].dtype == value.dtype and resident[key].shape[0] == value.shape[0], key
    assert resident["images"].shape == streamed["images"].shape
    # the same sample has the same pixels and tokens in both paths
    key = resident["keys"][0]
    row = split.keys.index(key)
    assert torch.equal(resident["images"][0], split.images[row])
    assert torch.equal(resident["ids"][0, :int(resident["n_captions"][0])], split.ids[row, :int(split.n_captions[row])])


def test_same_seed_and_step_give_the_same_batch_after_a_resume(split):
    bpe = batches_per_epoch(len(split), 16, 1)
    full = list(islice(iter(ResidentBatches(split, 16, bpe, seed=3)), 2 * bpe + 3))
    for start in (1, bpe - 1, bpe, 2 * bpe + 1):
        resumed = list(islice(iter(ResidentBatches(split, 16, bpe, seed=3, start_batch=start)), 2))
        for a, b in zip(resumed, full[start:start + 2]):
            assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["ids"], b["ids"])
    other = next(iter(ResidentBatches(split, 16, bpe, seed=4)))
    assert other["keys"] != full[0]["keys"]
    assert full[0]["keys"] != full[bpe]["keys"]  # each epoch its own order


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_is_one_pass_the_ranks_split_it_and_only_the_last_batch_wraps(split, world):
    batch = 16
    bpe = batches_per_epoch(len(split), batch, world)
    seen = []
    for rank in range(world):
        keys = [k for b in islice(iter(ResidentBatches(split, batch, bpe, rank=rank, world_size=world)), bpe)
                for k in b["keys"]]
        mine = len(range(rank, len(split), world))
        assert len(set(keys)) == mine and len(keys) == bpe * batch  # all of its share; the wrap repeats a few
        assert len(set(keys[:mine])) == mine  # nothing repeats before its share is done
        seen.append(set(keys))
    assert set().union(*seen) == set(split.keys)
    assert sum(len(s) for s in seen) == len(split)  # ranks disjoint


def test_the_split_must_fit_the_stated_budget():
    with pytest.raises(UserError, match=r"needs 0\.27 GB \(1000 images x 299x299x3 bytes\).*--device-memory-gb"):
        check_fits(1000, 299, 0.1e9, "--device-memory-gb 0.1")
    assert check_fits(1000, 299, 1e9, "x") == 1000 * 299 * 299 * 3
    assert memory_budget(torch.device("cpu"), 2.5) == (2.5e9, "--device-memory-gb 2.5")
    budget, source = memory_budget(torch.device("cpu"), 0, local_ranks=2)
    assert 0 < budget and "available RAM" in source and "2 local rank" in source
