"""Files a user might receive are never unpickled, decoded images are size-limited, and paths from
caption or pair files never leave the image root.

Every pickle here carries a live payload (`os.system("touch MARKER")` through `__reduce__`); a
control shows that plain unpickling does run it, and every real reader is checked not to.
Escaping paths and the pixel limit in build-shards and the scorer are covered case by case in
tests/test_bad_inputs.py (`symlink`, `../`, absolute path, decompression bomb).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from badcorpus import png_bomb, smooth, tiff_without_second_frame_size
from itsim.train import checkpoint
from itsim.errors import UserError
from itsim.images import encode_jpeg, load_image
from itsim.model import ItsimModel, ModelConfig, Preprocess, load_model, save_model
from itsim.text import Vocab

SIZE = 32
CAPTIONS = ["a red circle on the grass", "a blue square near water", "a green triangle in the sky",
            "two dogs play with a ball", "a man rides a bike", "a child sits on a bench", "a cat sleeps on a mat"]
TINY = dict(channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16, image_dim=16, head_dim=8)


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def payload_pickle(marker: Path) -> bytes:
    data = pickle.dumps({"weights": Payload(marker)})
    pickle.loads(data)  # control: the payload is live
    assert marker.exists(), "the payload did not run when unpickled; the tests below would prove nothing"
    marker.unlink()
    return data


def payload_torch(marker: Path) -> bytes:
    """The same payload in torch.save's zip format (what optimizer.bin and *.pkl checkpoints hold)."""
    buf = io.BytesIO()
    torch.save({"state": {}, "param_groups": [], "extra": Payload(marker)}, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # control
    assert marker.exists()
    marker.unlink()
    return buf.getvalue()


def tiny_model_dir(path: Path, vocab: Vocab) -> Path:
    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), **TINY)).eval()
    return save_model(path, model, vocab, Preprocess(image_size=SIZE))


# ---- model directories -----------------------------------------------------------------------------

def test_model_dir_is_safetensors_and_json_and_loads_without_pickle(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path / "model", Vocab.build(CAPTIONS))
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("load_model used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, vocab, pre = load_model(model_dir)
    assert len(vocab) == len(Vocab.build(CAPTIONS)) and pre.image_size == SIZE


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_named_model_safetensors_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned_model"
    model_dir = tiny_model_dir(tmp_path / "model", Vocab.build(CAPTIONS))
    evil = payload_pickle(marker) if kind == "pickle" else payload_torch(marker)
    (model_dir / "model.safetensors").write_bytes(evil)
    (model_dir / "pytorch_model.bin").write_bytes(evil)  # a decoy next to it is never looked at
    with pytest.raises(UserError, match="cannot load weights"):
        load_model(model_dir)
    assert not marker.exists()


# ---- checkpoints -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    from itsim.train import TrainConfig, train

    run = tmp_path_factory.mktemp("sec_run")
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=4, checkpoint_every=2, keep=5, batch_size=8,
                      workers=0, tensorboard=False, eval_every=0, **TINY))
    return run


def _plant(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file and record its new checksum, as someone who can write the folder could."""
    (ckpt / name).write_bytes(data)
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    state["files"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_with_a_planted_pickle_is_skipped_never_unpickled(trained, tiny_shards, tmp_path, caplog, name):
    import logging
    import shutil

    from accelerate.utils import load as accelerate_load

    from itsim.train import TrainConfig, train

    caplog.set_level(logging.INFO)
    marker = tmp_path / "pwned_ckpt"
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpts = run / "checkpoints"
    newest = ckpts / "step_0000004"
    _plant(newest, name, payload_torch(marker))

    with pytest.raises(checkpoint.CheckpointError, match=f"{name} cannot be loaded safely"):
        checkpoint.verify(newest)
    with pytest.raises(Exception, match="Weights only load failed"):  # Accelerate's own loader: weights_only=True
        accelerate_load(str(newest / name), map_location="cpu")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        checkpoint.find_resume(ckpts, str(newest))
    summary = train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=6, checkpoint_every=2, keep=5,
                                batch_size=8, workers=0, tensorboard=False, eval_every=0, resume="auto", **TINY))
    assert summary["step"] == 6
    assert "skipping unusable checkpoint step_0000004" in caplog.text
    assert "resumed from" in caplog.text and "step_0000002 (step 2)" in caplog.text
    assert not marker.exists()


# ---- shards ---------------------------------------------------------------------------------------

def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


GOOD_KEYS = [f"good{i}" for i in range(6)] + ["extras"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A shard folder whose one tar mixes good samples with pickle payloads and a decompression bomb:
    `extras` is a good sample carrying .pyd/.pickle/.pth members, `objnpy` has an object-array
    ids.npy, `bomb` a 400 Mpx PNG as its image, `onlypyd` nothing but a .pyd member."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "pwned_shard"
    evil = payload_pickle(marker)
    folder = root / "shards"
    folder.mkdir()
    vocab = Vocab.build(CAPTIONS)
    vocab.save(folder / "vocab.json")

    def sample(tar, key, i, jpg=None, ids=None):
        caps = [CAPTIONS[i % len(CAPTIONS)], CAPTIONS[(i + 3) % len(CAPTIONS)]]
        good_ids, lengths = vocab.encode(caps, 100)
        meta = {"image": f"{key}.jpg", "captions": caps, "caption_idx": [0, 1], "split": "test", "source": "t"}
        _member(tar, f"{key}.ids.npy", ids if ids is not None else _npy(good_ids))
        _member(tar, f"{key}.jpg", jpg if jpg is not None else encode_jpeg(load_image(smooth(i), SIZE)))
        _member(tar, f"{key}.json", json.dumps(meta).encode())
        _member(tar, f"{key}.lengths.npy", _npy(lengths))

    with tarfile.open(folder / "test-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(3):
            sample(tar, f"good{i}", i)
        sample(tar, "extras", 3)
        for ext in ("pyd", "pickle", "pth"):
            _member(tar, f"extras.{ext}", evil)
        objnpy = _npy(np.array([Payload(marker)], dtype=object), allow_pickle=True)
        np.load(io.BytesIO(objnpy), allow_pickle=True)  # control: loading it with pickle allowed runs the payload
        assert marker.exists(), "the object array's payload did not run when loaded with allow_pickle=True"
        marker.unlink()
        sample(tar, "objnpy", 4, ids=objnpy)
        sample(tar, "bomb", 5, jpg=png_bomb())
        _member(tar, "onlypyd.pyd", evil)
        for i in range(3, 6):
            sample(tar, f"good{i}", i + 1)
    splits = {s: {"images": 7, "shards": ["test-000000.tar"]} for s in ("train", "val", "test")}
    (folder / "manifest.json").write_text(json.dumps({"splits": splits, "config": {"image_size": SIZE}}))
    assert not marker.exists()
    return {"folder": folder, "tar": folder / "test-000000.tar", "marker": marker, "vocab": vocab, "root": root}


def test_control_plain_webdataset_decode_would_run_the_shard_payload(hostile, tmp_path):
    """Why our readers never call webdataset's default decoders: they unpickle .pyd members."""
    import webdataset as wds

    marker = tmp_path / "pwned_control"
    with tarfile.open(tmp_path / "control.tar", "w") as tar:
        _member(tar, "x.pyd", payload_pickle(marker))
    if wds.utils.enforce_security:
        pytest.skip("WDS_SECURE is set in this environment")
    list(wds.WebDataset(str(tmp_path / "control.tar"), shardshuffle=False).decode())
    assert marker.exists()


def test_training_loader_skips_payloads_and_the_bomb_without_running_them(hostile):
    from itsim.data.loader import StreamSpec, make_loader

    # 9 complete samples per pass (the 7 good ones, objnpy, bomb): one pass per batch of 9.
    spec = StreamSpec(shards=[str(hostile["tar"])], batch_size=9, batches_per_epoch=2, shuffle_buffer=20)
    batches = [b for _, b in zip(range(2), make_loader(spec, workers=0))]
    for batch in batches:
        assert sorted(batch["keys"]) == sorted(GOOD_KEYS)
        assert batch["images"].shape == (7, SIZE, SIZE, 3)
    assert batches[0]["bad_samples"] == 2 and batches[1]["bad_samples"] == 4  # objnpy + bomb, each pass
    assert not hostile["marker"].exists()


def test_read_split_skips_payloads_and_the_bomb(hostile, caplog):
    from itsim.data.loader import read_split

    samples = read_split(hostile["folder"], "val")
    assert sorted(s["key"] for s in samples) == sorted(GOOD_KEYS)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for key in ("objnpy", "bomb"):  # each skipped sample is logged with its key and shard
        assert any(key in w and hostile["tar"].name in w for w in warnings), warnings
    assert any("bomb" in w and "too_many_pixels" in w for w in warnings)
    assert not hostile["marker"].exists()


def test_evaluate_shards_and_pair_file_never_unpickle_escape_or_decode_bombs(hostile, tmp_path):
    from itsim.eval.evaluate import EvalConfig, evaluate

    pwned = tmp_path / "pwned"  # every payload planted below creates this file if it ever runs
    model_dir = tiny_model_dir(tmp_path / "model", hostile["vocab"])
    (model_dir / "pytorch_model.bin").write_bytes(payload_pickle(pwned))  # decoys beside the real weights
    (model_dir / "optimizer.bin").write_bytes(payload_torch(pwned))
    images = tmp_path / "images"
    images.mkdir()
    (images / "evil.pkl").write_bytes(payload_pickle(pwned))  # a pair row names a pickle as its image
    smooth(0).save(images / "a.jpg")
    smooth(1).save(images / "b.jpg")
    (images / "bomb.png").write_bytes(png_bomb())
    (images / "noframe.tif").write_bytes(tiff_without_second_frame_size())
    smooth(2).save(tmp_path / "outside.jpg")
    (images / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    rows = [("a.jpg", CAPTIONS[0], "match"), ("b.jpg", CAPTIONS[1], "no-match"), ("b.jpg", CAPTIONS[2], "match"),
            ("../outside.jpg", CAPTIONS[0], "match"), (str(tmp_path / "outside.jpg"), CAPTIONS[1], "match"),
            ("link.jpg", CAPTIONS[2], "no-match"), ("bomb.png", CAPTIONS[3], "match"),
            ("noframe.tif", CAPTIONS[4], "no-match"), ("evil.pkl", CAPTIONS[5], "match")]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{i}\t{c}\t{lab}\n" for i, c, lab in rows))
    result = evaluate(EvalConfig(model=str(model_dir), shards=str(hostile["folder"]), split="test",
                                 pairs=str(pairs), images=str(images), out=str(tmp_path / "eval"), plots=False,
                                 device="cpu"))
    assert result["n_images"] == 7
    assert result["skipped_reasons"] == {"bad_sample": 1, "image_too_many_pixels": 1}
    assert result["pairs_rows"] == 9 and result["pairs_scored"] == 3
    assert result["pairs_skipped_reasons"] == {"image_path_escape": 3, "image_too_many_pixels": 1,
                                               "image_decode_error": 1, "image_not_an_image": 1}
    assert not hostile["marker"].exists() and not pwned.exists()


@pytest.mark.timeout(300)
def test_scorer_shard_input_never_unpickles_and_refuses_the_bomb(hostile, ray_local, tmp_path):
    import pandas as pd

    from itsim.score.ray_job import ScoreConfig, run_score

    model_dir = tiny_model_dir(tmp_path / "model", hostile["vocab"])
    summary = run_score(ScoreConfig(model=str(model_dir), input=(str(hostile["folder"]),), split="test",
                                    output=str(tmp_path / "out"), batch_size=8, workers=1))
    df = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("*.parquet")))
    by_key = df.groupby("key")["error"].agg(lambda e: sorted({x for x in e if isinstance(x, str)}))
    assert by_key["bomb"] == ["too_many_pixels"]
    assert all(by_key[k] == [] for k in GOOD_KEYS + ["objnpy"])  # the scorer reads only jpg + json
    assert "onlypyd" not in by_key or by_key["onlypyd"] == ["bad_sample"]
    assert summary["rows"] == len(df)
    assert not hostile["marker"].exists()
