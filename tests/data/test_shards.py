"""build-shards end to end: real JPEG/PNG inputs, real tar shards read back with plain webdataset,
real worker processes and a real SIGKILLed subprocess."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itsim.cli import main as cli_main
from itsim.data.shards.writer import MEMBERS, _tar_header, _tarinfo, make_keys
from itsim.data.shards import FailureRateError, ShardConfig, build_shards
from itsim.errors import UserError
from itsim.images import load_image
from itsim.text import Vocab

ROOT = Path(__file__).resolve().parents[2]
SIZE = 48


# ---- inputs ------------------------------------------------------------------------------------

def smooth_image(seed: int, width: int = 96, height: int = 64) -> Image.Image:
    """Gradients and a block: photo-like enough that JPEG round trips stay within a few levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r, g, b = rng.integers(40, 216, 3)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    blob = 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.05 * width * height))
    arr = np.stack([r + 40 * x / width, g + 40 * y / height, b - blob], -1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_captions(path: Path, rows: list[tuple[str, int, str]], extra_lines: tuple[str, ...] = ()) -> int:
    """Flickr30k results.csv; returns the number of data rows (what must be accounted for)."""
    lines = ["image_name| comment_number| comment", *(f"{img}| {i}| {cap}" for img, i, cap in rows), *extra_lines]
    path.write_text("\n".join(lines) + "\n")
    return len(rows) + len(extra_lines)


def make_dataset(root: Path, n: int, width: int = 96, height: int = 64, words=lambda i: "") -> tuple[Path, Path, int]:
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        smooth_image(i, width, height).save(images / f"img{i:03d}.jpg", quality=92)
        rows += [(f"img{i:03d}.jpg", j, f"A dog number {i % 7} runs {'fast' if j else 'slowly'} {words(i)} .")
                 for j in range(2)]
    captions = root / "results.csv"
    return captions, images, write_captions(captions, rows)


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def read_shards(out: Path) -> list[dict]:
    """Every sample of every split, read by plain webdataset (no decoding, no pickle)."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / name) for split in manifest["splits"].values() for name in split["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def cfg_for(captions: Path, images: Path, out: Path, **kw) -> ShardConfig:
    base = dict(captions=str(captions), images=str(images), out=str(out), image_size=SIZE, shard_size=4,
                workers=1, splits=(0.6, 0.2, 0.2))
    return ShardConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path, int]:
    return make_dataset(tmp_path_factory.mktemp("small"), 14)


# ---- round trip and determinism ----------------------------------------------------------------

def test_round_trip_pixels_ids_and_layout(small, tmp_path):
    captions, images, n_rows = small
    out = tmp_path / "out"
    manifest = build_shards(cfg_for(captions, images, out))
    samples = read_shards(out)
    vocab = Vocab.load(out / "vocab.json")

    assert len(samples) == 14 and manifest["failures"]["records"] == 0
    assert manifest["rows"] == {"input": n_rows, "in_shards": n_rows, "in_failures": 0, "accounted": n_rows}
    for sample in samples:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", sample["__key__"])
        meta = json.loads(sample["json"])
        assert set(meta) == {"image", "captions", "caption_idx", "split", "source"}
        assert meta["source"] == "results.csv" and meta["caption_idx"] == [0, 1]
        assert sample["txt"].decode() == meta["captions"][0]  # for open_clip / img2dataset-style readers
        assert Path(sample["__url__"]).name.startswith(meta["split"] + "-")
        stored = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        expected = np.asarray(load_image(images / meta["image"], SIZE, "stretch"))
        assert stored.shape == (SIZE, SIZE, 3)
        assert np.abs(stored.astype(int) - expected.astype(int)).mean() < 3
        ids, lengths = npy(sample["ids.npy"]), npy(sample["lengths.npy"])
        want_ids, want_lengths = vocab.encode(meta["captions"], 100)
        assert ids.dtype == np.int32 and lengths.dtype == np.int32 and ids.shape == (2, 100)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(lengths, want_lengths)

    for split, entry in manifest["splits"].items():
        assert entry["n_shards"] == len(entry["shards"])
        for name in entry["shards"]:
            with tarfile.open(out / name) as tar:
                members = tar.getmembers()
            assert len(members) <= 4 * len(MEMBERS) and all(m.mtime == 0 for m in members)
            assert [m.name.split(".", 1)[1] for m in members[:len(MEMBERS)]] == list(MEMBERS)
            stats = json.loads((out / name.replace(".tar", "_stats.json")).read_text())
            assert stats["bytes"] == (out / name).stat().st_size
            assert stats["images_ok"] == len(members) // len(MEMBERS)
    assert sum(e["images"] for e in manifest["splits"].values()) == 14
    assert manifest["vocab"] == {"file": "vocab.json", "hash": vocab.hash, "size": len(vocab), "source": "train split"}
    assert manifest["config"]["image_size"] == SIZE and manifest["source"]["format"] == "flickr30k_csv"
    assert (out / "failures.jsonl").read_text() == ""


# ---- other readers: plain webdataset (open_clip style), wids indexes, Ray Data ----------------------

def _first_captions(out: Path, split: str) -> dict[str, str]:
    """Sample key -> first caption, from the json member, for every sample of a split."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["__key__"]: json.loads(s["json"])["captions"][0] for s in read_shards(out)
            if Path(s["__url__"]).name in manifest["splits"][split]["shards"]}


def test_plain_webdataset_reads_every_sample_as_jpg_and_txt_through_the_brace_pattern(small, tmp_path):
    import braceexpand
    import webdataset as wds

    out = tmp_path / "out"
    manifest = build_shards(cfg_for(small[0], small[1], out))
    for split, entry in manifest["splits"].items():
        if not entry["shards"]:
            assert entry["pattern"] is None and entry["index"] is None
            continue
        assert list(braceexpand.braceexpand(entry["pattern"])) == entry["shards"]
        assert entry["samples_per_shard"] == [json.loads((out / n.replace(".tar", "_stats.json")).read_text())
                                              ["images_ok"] for n in entry["shards"]]
        pipeline = wds.WebDataset(str(out / entry["pattern"]), shardshuffle=False).decode("pil").to_tuple(
            "__key__", "jpg", "txt")
        got = {key: (img.size, txt) for key, img, txt in pipeline}
        want = _first_captions(out, split)
        assert len(got) == entry["images"] == sum(entry["samples_per_shard"]) == len(want)
        assert got == {key: ((SIZE, SIZE), caption) for key, caption in want.items()}


def test_wids_index_per_split_lists_every_shard_with_its_samples(small, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    manifest = build_shards(cfg_for(small[0], small[1], out))
    indexed = 0
    for split, entry in manifest["splits"].items():
        if not entry["shards"]:
            assert not (out / f"{split}.wids.json").exists()
            continue
        assert entry["index"] == f"{split}.wids.json"
        index = json.loads((out / entry["index"]).read_text())
        # The format of webdataset's `widsindex create` (wids/wids_index.py), with URLs relative to the index.
        assert set(index) == {"__kind__", "wids_version", "shardlist"}
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert [s["url"] for s in index["shardlist"]] == entry["shards"]
        for shard in index["shardlist"]:
            assert set(shard) == {"url", "md5sum", "nsamples", "filesize"}
            data = (out / shard["url"]).read_bytes()
            assert shard["md5sum"] == hashlib.md5(data).hexdigest() and shard["filesize"] == len(data)
            assert shard["nsamples"] == len(list(wds.WebDataset(str(out / shard["url"]), shardshuffle=False)))
            indexed += shard["nsamples"]
    assert indexed == 14
    # A rebuild whose plan has no test split any more removes the stale test index.
    build_shards(cfg_for(small[0], small[1], out, splits=(0.7, 0.3, 0.0), overwrite=True))
    assert not (out / "test.wids.json").exists() and (out / "val.wids.json").exists()


@pytest.mark.timeout(300)
def test_ray_read_webdataset_reads_every_sample(small, tmp_path, ray_local):
    out = tmp_path / "out"
    manifest = build_shards(cfg_for(small[0], small[1], out))
    paths = [str(out / name) for entry in manifest["splits"].values() for name in entry["shards"]]
    rows = ray_local.data.read_webdataset(paths).take_all()  # Ray's own decoding of every member
    want = {k: c for split in ("train", "val", "test") for k, c in _first_captions(out, split).items()}
    assert len(rows) == 14 == len(want)
    assert {r["__key__"]: r["txt"] for r in rows} == want
    assert all(r["jpg"].shape == (SIZE, SIZE, 3) and r["json"]["captions"][0] == r["txt"] for r in rows)
    assert all(r["ids.npy"].shape == (2, 100) and r["lengths.npy"].shape == (2,) for r in rows)


def check_recorded_hashes(out: Path) -> int:
    """Each shard in the manifest: _stats.json has the file's sha256 and size, and the file is what the
    stdlib's tarfile writes for the same members. Returns the number of shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    names = [name for split in manifest["splits"].values() for name in split["shards"]]
    for name in names:
        data = (out / name).read_bytes()
        stats = json.loads((out / name.replace(".tar", "_stats.json")).read_text())
        assert stats["sha256"] == hashlib.sha256(data).hexdigest() and stats["bytes"] == len(data), name
        assert stats["md5"] == hashlib.md5(data).hexdigest(), name
        again = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar, \
                tarfile.open(fileobj=again, mode="w", format=tarfile.USTAR_FORMAT) as copy:
            assert len(tar.getmembers()) == len(MEMBERS) * stats["images_ok"]
            for member in tar.getmembers():
                copy.addfile(member, tar.extractfile(member))
        assert again.getvalue() == data, name
    return len(names)


def test_same_bytes_for_one_and_two_workers(small, tmp_path):
    captions, images, _ = small
    build_shards(cfg_for(captions, images, tmp_path / "w1", workers=1))
    build_shards(cfg_for(captions, images, tmp_path / "w2", workers=2))
    one, two = tar_hashes(tmp_path / "w1"), tar_hashes(tmp_path / "w2")
    assert len(one) >= 3 and one == two
    assert check_recorded_hashes(tmp_path / "w1") == check_recorded_hashes(tmp_path / "w2") == len(one)


def test_recorded_sha256_matches_shards_with_failures(small, messy, tmp_path):
    assert check_recorded_hashes(messy[4] / "out") >= 2  # failed images between good ones
    # A shard in which every image fails is still a valid (empty) tar with a matching hash.
    write_captions(tmp_path / "gone.csv", [(f"gone{i}.jpg", 0, "a dog runs") for i in range(3)])
    build_shards(cfg_for(tmp_path / "gone.csv", small[1], tmp_path / "out", splits=(1.0, 0, 0), max_failure_rate=1.0))
    assert check_recorded_hashes(tmp_path / "out") == 1


@pytest.mark.parametrize("name", ["a.jpg", "a.txt", "k" * 96 + ".txt", "k" * 100, "ü" * 50, "\udcff.json", "k" * 101,
                                  "dir/" + "k" * 99])
@pytest.mark.parametrize("size", [0, 511, 512, 30000, 8 ** 11 - 1, 8 ** 11])
def test_member_headers_are_the_ones_tarfile_writes(name, size):
    # Shards are compared by hash across versions and worker counts; the fast header must not drift.
    headers = []
    for make in (lambda: _tar_header(name, size), lambda: _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT)):
        try:
            headers.append(make())
        except ValueError as exc:  # too long for USTAR: the same refusal either way
            headers.append(repr(exc))
    assert headers[0] == headers[1]


@pytest.mark.slow
def test_ray_engine_writes_the_same_bytes(small, tmp_path, ray_local):
    captions, images, _ = small
    build_shards(cfg_for(captions, images, tmp_path / "p", workers=1))
    build_shards(cfg_for(captions, images, tmp_path / "r", engine="ray", workers=2))
    assert tar_hashes(tmp_path / "p") == tar_hashes(tmp_path / "r")


def test_resume_after_sigkill_gives_identical_bytes(tmp_path):
    # Large stored images make each shard take long enough to kill the build part-way.
    captions, images, _ = make_dataset(tmp_path / "data", 40, 160, 120)
    args = dict(image_size=384, shard_size=4, workers=1)
    clean = tmp_path / "clean"
    build_shards(cfg_for(captions, images, clean, **args))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "itsim.cli", "build-shards", "--captions", str(captions), "--images", str(images),
           "--out", str(out), "--image-size", "384", "--shard-size", "4", "--workers", "1", "--splits", "0.6,0.2,0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not list(out.glob("*_stats.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before the kill; the test proves nothing"
    written = len(list(out.glob("*.tar")))
    assert 1 <= written < len(tar_hashes(clean))

    manifest = build_shards(cfg_for(captions, images, out, **args))
    assert tar_hashes(out) == tar_hashes(clean)
    assert 0 < manifest["images_written_now"] < 40
    assert not list(out.glob("*.tmp"))


def test_rerun_skips_complete_shards_and_rewrites_damaged_ones(small, tmp_path):
    captions, images, _ = small
    out = tmp_path / "out"
    build_shards(cfg_for(captions, images, out))
    before = tar_hashes(out)
    names = sorted(before)
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    redo = sum(json.loads((out / n.replace(".tar", "_stats.json")).read_text())["images_planned"] for n in names[1:3])
    damaged = out / names[1]
    damaged.write_bytes(damaged.read_bytes()[:1000])  # partial tar with its stats still present
    (out / names[2].replace(".tar", "_stats.json")).unlink()  # tar without stats = incomplete
    manifest = build_shards(cfg_for(captions, images, out, workers=2))
    assert tar_hashes(out) == before
    assert manifest["images_written_now"] == redo
    assert all((out / n).stat().st_mtime_ns == mtimes[n] for n in names if n not in names[1:3])


def test_changed_config_is_refused_unless_overwrite(small, tmp_path):
    captions, images, _ = small
    out = tmp_path / "out"
    build_shards(cfg_for(captions, images, out))
    with pytest.raises(UserError, match="config differs in image_size"):
        build_shards(cfg_for(captions, images, out, image_size=32))
    build_shards(cfg_for(captions, images, out, workers=2, max_failure_rate=0.5))  # runtime-only changes are fine
    manifest = build_shards(cfg_for(captions, images, out, image_size=32, overwrite=True))
    sample = read_shards(out)[0]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32) and manifest["config"]["image_size"] == 32


# ---- bad input -----------------------------------------------------------------------------------

def png_header_bomb(width: int, height: int) -> bytes:
    """A ~100-byte PNG that claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """One folder with every kind of bad and unusual input; built once, checked by several tests."""
    root = tmp_path_factory.mktemp("messy")
    images = root / "images"
    images.mkdir()
    smooth_image(0).save(images / "good.jpg")
    smooth_image(1).save(images / "png_named.jpg", format="PNG")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 32768, np.uint16)).save(images / "gray16.png")
    Image.new("L", (40, 30), 77).save(images / "gray.jpg")
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent -> white
    rgba.save(images / "rgba.png")
    Image.new("RGB", (40, 30), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    rotated = Image.new("RGB", (60, 30), (255, 0, 0))
    rotated.paste((0, 0, 255), (30, 0, 60, 30))  # stored: red left, blue right; displayed rotated 90° CW
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(images / "exif6.jpg", exif=exif, quality=95)
    (images / "zero.jpg").write_bytes(b"")
    full = io.BytesIO()
    smooth_image(2, 200, 150).save(full, format="JPEG")
    (images / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (images / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (images / "bomb.png").write_bytes(png_header_bomb(20000, 20000))
    smooth_image(3).save(root / "outside.jpg")
    (images / "link.jpg").symlink_to(root / "outside.jpg")
    smooth_image(4).save(images / "emptycap.jpg")
    smooth_image(5).save(images / "halfempty.jpg")
    names = ["good.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png", "gray.jpg", "rgba.png", "palette.png",
             "exif6.jpg", "missing.jpg", "zero.jpg", "truncated.jpg", "random.jpg", "bomb.png", "../outside.jpg",
             str(root / "outside.jpg"), "link.jpg"]
    rows = [(name, j, f"a picture of {Path(name).stem} number {j}") for name in names for j in range(2)]
    rows += [("emptycap.jpg", 0, "..."), ("emptycap.jpg", 1, "?!"),
             ("halfempty.jpg", 0, "a half empty one"), ("halfempty.jpg", 1, "--")]
    captions = root / "results.csv"
    # A caption the reader itself drops (blank) and a line it cannot parse.
    n_rows = write_captions(captions, rows, extra_lines=("good.jpg| 2|   ", "this line has no delimiters"))
    out = root / "out"
    manifest = build_shards(cfg_for(captions, images, out, max_failure_rate=1.0, splits=(1.0, 0.0, 0.0)))
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    samples = {json.loads(s["json"])["image"]: s for s in read_shards(out)}
    return manifest, failures, samples, n_rows, root


@pytest.mark.parametrize("name, reason", [
    ("missing.jpg", "missing"), ("zero.jpg", "empty_file"), ("truncated.jpg", "decode_error"),
    ("random.jpg", "not_an_image"), ("bomb.png", "too_many_pixels"), ("../outside.jpg", "path_escape"),
    ("link.jpg", "path_escape"), ("emptycap.jpg", "empty_caption")])
def test_bad_input_is_recorded_with_its_reason(messy, name, reason):
    manifest, failures, samples, _, _ = messy
    records = [f for f in failures if f["image"] == name]
    assert [f["reason"] for f in records] == [reason]
    assert records[0]["caption_rows"] == 2 and name not in samples
    if reason == "empty_caption":
        assert records[0]["shard"] is None and records[0]["detail"].startswith("all 2 captions")
    else:
        assert re.fullmatch(r"train-\d{6}", records[0]["shard"])
    assert manifest["failures"]["by_reason"][reason]["records"] >= 1


def test_absolute_path_outside_the_image_folder_is_refused(messy):
    _, failures, samples, _, root = messy
    name = str(root / "outside.jpg")
    assert [f["reason"] for f in failures if f["image"] == name] == ["path_escape"] and name not in samples


@pytest.mark.parametrize("name", ["good.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png", "gray.jpg", "rgba.png",
                                  "palette.png", "exif6.jpg"])
def test_unusual_images_come_out_rgb(messy, name):
    img = Image.open(io.BytesIO(messy[2][name]["jpg"]))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE, SIZE)


def test_conversions_keep_the_right_colours(messy):
    px = {name: np.asarray(Image.open(io.BytesIO(s["jpg"]))).astype(int) for name, s in messy[2].items()}
    assert np.allclose(px["cmyk.jpg"].mean((0, 1)), [255, 0, 0], atol=12)
    assert np.allclose(px["gray16.png"].mean((0, 1)), [128, 128, 128], atol=3)
    assert np.allclose(px["gray.jpg"].mean((0, 1)), [77, 77, 77], atol=3)
    assert np.allclose(px["palette.png"].mean((0, 1)), [0, 200, 0], atol=6)
    assert np.allclose(px["rgba.png"][:, :20].mean((0, 1)), [255, 255, 255], atol=6)  # transparent -> white
    assert np.allclose(px["rgba.png"][:, -20:].mean((0, 1)), [0, 0, 255], atol=12)
    # EXIF orientation 6: the stored left (red) half is displayed on top.
    assert np.allclose(px["exif6.jpg"][:20].mean((0, 1)), [255, 0, 0], atol=20)
    assert np.allclose(px["exif6.jpg"][-20:].mean((0, 1)), [0, 0, 255], atol=20)


def test_every_input_row_is_in_a_shard_or_in_failures(messy):
    manifest, failures, samples, n_rows, _ = messy
    in_shards = sum(len(json.loads(s["json"])["captions"]) for s in samples.values())
    in_failures = sum(f["caption_rows"] for f in failures)
    assert in_shards + in_failures == n_rows
    assert manifest["rows"] == {"input": n_rows, "in_shards": in_shards, "in_failures": in_failures,
                                "accounted": n_rows}
    assert manifest["reader"]["rows_in"] == n_rows
    reader = {f["reason"]: f for f in failures if f["image"] is None}
    assert reader["missing_delimiter"]["caption_rows"] == 1 and reader["empty_caption"]["caption_rows"] == 1
    half = [f for f in failures if f["image"] == "halfempty.jpg"]
    assert [(f["reason"], f["caption_rows"]) for f in half] == [("empty_caption", 1)]
    assert json.loads(samples["halfempty.jpg"]["json"])["captions"] == ["a half empty one"]
    assert manifest["failures"]["images"] == 9  # 8 unusable images + the one whose captions are all empty
    assert manifest["failures"]["caption_rows"] == in_failures


def test_failure_rate_sets_the_exit_code(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    smooth_image(0).save(images / "a.jpg")
    smooth_image(1).save(images / "b.jpg")
    captions = tmp_path / "results.csv"
    write_captions(captions, [(n, 0, f"caption of {n}") for n in ("a.jpg", "b.jpg", "gone1.jpg")])
    argv = ["build-shards", "--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "out"),
            "--image-size", "32", "--workers", "1", "--splits", "1,0,0"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 3 caption rows failed" in err and "Traceback" not in err
    assert (tmp_path / "out" / "manifest.json").exists()
    assert cli_main(argv + ["--max-failure-rate", "0.5"]) == 0
    assert "2 images, 2 captions, 1 shards, 1 failures" in capsys.readouterr().out
    with pytest.raises(FailureRateError):
        build_shards(cfg_for(captions, images, tmp_path / "api", image_size=32, splits=(1.0, 0.0, 0.0)))


@pytest.mark.parametrize("missing", ["captions", "images"])
def test_unreadable_input_is_one_line_exit_2(small, tmp_path, capsys, missing):
    captions, images, _ = small
    paths = {"captions": captions, "images": images, missing: tmp_path / "nope"}
    code = cli_main(["build-shards", "--captions", str(paths["captions"]), "--images", str(paths["images"]),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found" in err and str(tmp_path / "nope") in err


# ---- vocab, splits, keys -------------------------------------------------------------------------

def test_vocab_comes_from_train_split_only(tmp_path):
    captions, images, _ = make_dataset(tmp_path / "data", 20, 16, 16, words=lambda i: f"uniq{i}")
    val_list = tmp_path / "val.txt"
    val_list.write_text("img003.jpg\nimg011.jpg\n")
    out = tmp_path / "out"
    manifest = build_shards(cfg_for(captions, images, out, val_images=str(val_list), splits=(0.5, 0.0, 0.5)))
    vocab = Vocab.load(out / "vocab.json")
    splits = {}
    for sample in read_shards(out):
        meta = json.loads(sample["json"])
        splits[meta["image"]] = meta["split"]
    assert splits["img003.jpg"] == "val" and splits["img011.jpg"] == "val"
    assert {s for s in splits.values()} == {"train", "val", "test"}
    for image, split in splits.items():
        assert (f"uniq{int(image[3:6])}" in vocab.index) == (split == "train")
    assert manifest["splits"]["val"]["images"] == 2

    reused = tmp_path / "reused"
    build_shards(cfg_for(captions, images, reused, vocab=str(out / "vocab.json"), splits=(1.0, 0.0, 0.0)))
    assert Vocab.load(reused / "vocab.json").hash == vocab.hash


def test_keys_are_safe_unique_and_dot_free():
    names = ["a.jpg", "a.png", "b c.jpg", "b_c.jpg", "x.y.z.jpg", "sub/dir/a.jpg", "../up.jpg", ".hidden",
             "ünïcode.jpg", "k" * 200 + ".jpg", "plain.jpg"]
    keys = make_keys(names)
    assert len(set(keys.values())) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,80}", k) for k in keys.values())
    assert keys["plain.jpg"] == "plain"
    assert make_keys(list(reversed(names))) == keys


def test_config_file_with_flags_overriding_it(small, tmp_path, capsys):
    captions, images, _ = small
    cfg_file = tmp_path / "shards.yaml"
    cfg_file.write_text(f"captions: {captions}\nimages: {images}\nimage_size: 32\nshard_size: 2\nworkers: 1\n")
    out = tmp_path / "out"
    assert cli_main(["build-shards", "--config", str(cfg_file), "--out", str(out), "--shard-size", "5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == 32 and manifest["config"]["shard_size"] == 5
    assert manifest["splits"]["train"]["n_shards"] == -(-manifest["splits"]["train"]["images"] // 5)
    assert f"-> {out}" in capsys.readouterr().out
    assert cli_main(["build-shards", "--config", str(out / "build_config.yaml")]) == 0  # a repeat: all complete
    assert json.loads((out / "manifest.json").read_text())["images_written_now"] == 0


def test_keys_that_fall_back_to_a_long_hash_still_fit_tar_member_names():
    import hashlib

    spaced = "x" * 49 + " a.jpg"  # unsafe: its key is `<49 x>_a-<8 hex>` ...
    clash = f"{'x' * 49}_a-{hashlib.sha1(spaced.encode()).hexdigest()[:8]}.jpg"  # ... which this clean name equals
    keys = make_keys([spaced, clash])
    assert len(set(keys.values())) == 2
    assert all(len(k + ".lengths.npy") <= 100 for k in keys.values()), keys


def _thirds(width: int, height: int) -> Image.Image:
    """Red, green and blue thirds along the long side (left to right when wide, top to bottom when tall)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    long = max(width, height)
    for i, colour in enumerate(((220, 30, 30), (30, 220, 30), (30, 30, 220))):
        part = slice(i * long // 3, (i + 1) * long // 3)
        if width >= height:
            arr[:, part] = colour
        else:
            arr[part, :] = colour
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["stretch", "center_crop", "pad"])
def test_resize_modes_store_the_promised_geometry(tmp_path, mode):
    """`--resize`: stretch squeezes the whole image, center_crop keeps the middle square, pad keeps the
    whole image and adds black bars; checked on a 3:1 wide and a 1:3 tall image in the stored JPEGs."""
    images = tmp_path / "images"
    images.mkdir()
    _thirds(120, 40).save(images / "wide.png")
    _thirds(40, 120).save(images / "tall.png")
    captions = tmp_path / "results.csv"
    write_captions(captions, [("wide.png", 0, "a wide picture"), ("tall.png", 0, "a tall picture")])
    out = tmp_path / "out"
    assert cli_main(["build-shards", "--captions", str(captions), "--images", str(images), "--out", str(out),
                     "--image-size", str(SIZE), "--splits", "1,0,0", "--workers", "1", "--resize", mode]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["resize"] == mode
    stored = {json.loads(s["json"])["image"]: np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), float)
              for s in read_shards(out)}
    red, green, blue, black = (220, 30, 30), (30, 220, 30), (30, 30, 220), (0, 0, 0)
    third, inner = SIZE // 3, slice(4, SIZE - 4)  # `inner` keeps off JPEG ringing at the edges

    def colour(region: np.ndarray, want: tuple[int, int, int]) -> bool:
        return bool(np.abs(region.reshape(-1, 3).mean(0) - want).max() < 12)

    for name, img in stored.items():
        assert img.shape == (SIZE, SIZE, 3), name
        along = img if name == "wide.png" else img.transpose(1, 0, 2)  # the long side runs along axis 1
        left, middle, right = along[:, 3:third - 3], along[:, third + 3:2 * third - 3], along[:, 2 * third + 3:-3]
        if mode == "stretch":  # all three thirds, over the whole square
            assert colour(left[inner], red) and colour(middle[inner], green) and colour(right[inner], blue), name
        elif mode == "center_crop":  # the middle square of a 3:1 image is its green third, enlarged
            assert colour(along[inner][:, inner], green), name
        else:  # pad: the whole image scaled to SIZE x SIZE/3, centred, black bars across the rest
            bar = SIZE // 3
            assert colour(along[: bar - 3], black) and colour(along[2 * bar + 3:], black), name
            band = slice(bar + 3, 2 * bar - 3)
            assert colour(left[band], red) and colour(middle[band], green) and colour(right[band], blue), name
