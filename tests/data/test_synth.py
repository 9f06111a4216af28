"""The synthetic data generator: byte-identical per seed, real Flickr30k layout, captions true of the pixels."""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from itsim.data.synth import writer as synth
from itsim.images import load_image
from itsim.text import tokenize

ROOT = Path(__file__).resolve().parents[2]
N = 30
SEED = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "a", N, SEED)


def _captions(csv_path: Path) -> pd.DataFrame:
    return pd.read_csv(csv_path, sep="|")


def test_same_seed_gives_identical_bytes_for_any_worker_count_and_other_seeds_differ(dataset: Path, tmp_path: Path):
    again = synth.generate(tmp_path / "b", N, SEED, workers=2)
    other = synth.generate(tmp_path / "c", N, SEED + 1)
    assert again.read_bytes() == dataset.read_bytes()
    for i in range(N):
        name = synth.image_name(i)
        assert (again.parent / "images" / name).read_bytes() == (dataset.parent / "images" / name).read_bytes()
    assert other.read_bytes() != dataset.read_bytes()
    differing = sum((other.parent / "images" / synth.image_name(i)).read_bytes()
                    != (dataset.parent / "images" / synth.image_name(i)).read_bytes() for i in range(N))
    assert differing == N


def test_results_csv_is_the_kaggle_flickr30k_format(dataset: Path):
    lines = dataset.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    row = re.compile(r"^synth_\d{6}\.jpg\| [0-4]\| [A-Z][a-z ]+ \.$")
    assert all(row.match(line) for line in lines[1:]), [x for x in lines[1:] if not row.match(x)][:3]
    df = _captions(dataset)
    assert list(df.columns) == ["image_name", " comment_number", " comment"]
    assert len(df) == 5 * N
    assert df["image_name"].tolist() == [synth.image_name(i) for i in range(N) for _ in range(5)]
    assert df[" comment_number"].tolist() == list(range(5)) * N
    assert (dataset.parent / "README.txt").read_text().strip()


def test_the_project_caption_reader_reads_every_row(dataset: Path):
    from itsim.data.captions import read_captions

    table, report = read_captions(dataset)
    assert report.format == "flickr30k_csv"
    assert len(table) == 5 * N and report.rows_out == 5 * N and not report.skipped
    assert table["caption"].str.contains(r"\|").sum() == 0


def test_images_are_jpegs_with_each_side_in_the_size_range(dataset: Path, tmp_path: Path):
    sizes = set()
    for i in range(N):
        with Image.open(dataset.parent / "images" / synth.image_name(i)) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            w, h = img.size
            assert 320 <= w <= 640 and 320 <= h <= 640
            assert (w, h) == (synth.scene_for(SEED, i).width, synth.scene_for(SEED, i).height)
            sizes.add((w, h))
    assert len(sizes) > N // 2  # varied, not one size
    small = synth.generate(tmp_path / "small", 10, 1, min_size=100, max_size=120, captions_per_image=3)
    for i in range(10):
        with Image.open(small.parent / "images" / synth.image_name(i)) as img:
            assert all(100 <= side <= 120 for side in img.size)
    assert _captions(small)[" comment_number"].tolist() == [0, 1, 2] * 10


def test_every_caption_names_the_main_objects_colour_and_shape(dataset: Path):
    df = _captions(dataset)
    for i in range(N):
        scene = synth.scene_for(SEED, i)
        noun = scene.main.shape if scene.main.count == 1 else synth.PLURALS[scene.main.shape]
        captions = df[" comment"][df["image_name"] == synth.image_name(i)].tolist()
        assert len(set(captions)) == 5  # five different paraphrases
        for caption in captions:
            words = tokenize(caption)
            assert scene.main.colour in words and noun in words, (caption, scene.main)


def test_the_captioned_main_colour_is_visible_at_64px(dataset: Path):
    """What the demo's matcher sees: a stretch resize to 64 px still shows the main colour."""
    for i in range(N):
        scene = synth.scene_for(SEED, i)
        pixels = np.asarray(load_image(dataset.parent / "images" / synth.image_name(i), 64), dtype=float)
        distance = np.linalg.norm(pixels.reshape(-1, 3) - np.array(synth.COLOURS[scene.main.colour]), axis=1)
        assert (distance < 70).mean() >= 0.005, (i, scene.main)
        background = np.array(synth.BACKGROUNDS[scene.background][0], dtype=float)
        assert np.linalg.norm(np.median(pixels.reshape(-1, 3), axis=0) - background) < 60


def test_vocabulary_is_small_and_other_images_captions_share_words():
    vocab: set[str] = set()
    captions = []
    for i in range(300):
        scene_rng, _, caption_rng = synth._rngs(0, i)
        caps = synth.make_captions(synth.make_scene(scene_rng), caption_rng, synth.MAX_CAPTIONS)
        vocab.update(w for c in caps for w in tokenize(c))
        captions.append(caps)
    assert set(synth.COLOURS) | set(synth.SHAPES) <= vocab
    assert 60 <= len(vocab) < 200
    stop = {"a", "an", "the", "on", "of", "in", "at", "is", "are", "and", "with", "to"}
    rng = random.Random(0)
    shared = []
    for _ in range(300):
        i, j = rng.sample(range(300), 2)
        shared.append(bool((set(tokenize(rng.choice(captions[i]))) - stop) & set(tokenize(rng.choice(captions[j])))))
    assert 0.3 < np.mean(shared) < 0.95  # a wrong caption often overlaps: matching is not a word lookup


def test_cli_writes_the_dataset_and_rejects_bad_sizes_in_one_line(tmp_path: Path):
    ok = subprocess.run([sys.executable, "-m", "itsim.cli", "synth", str(tmp_path / "cli"), "--images", "4",
                         "--seed", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "wrote 4 images" in ok.stdout
    assert len(_captions(tmp_path / "cli" / "results.csv")) == 20
    assert (tmp_path / "cli" / "synth_config.yaml").exists()
    bad = subprocess.run([sys.executable, "-m", "itsim.cli", "synth", str(tmp_path / "bad"), "--images", "4",
                          "--min-size", "500", "--max-size", "400"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "--min-size" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "results.csv").exists()
