"""By-image splits: stable hashing, source splits kept, explicit val lists, no image in two splits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from itsim.data.captions import read_captions
from itsim.data.splits import assign_splits

ROOT = Path(__file__).resolve().parents[2]


def captions(n_images: int, per_image: int = 5) -> pd.DataFrame:
    names = [f"{1000000 + i}_{i * 7919 % 100000:05x}.jpg" for i in range(n_images)]
    return pd.DataFrame({"image": [n for n in names for _ in range(per_image)],
                         "caption_idx": [k for _ in names for k in range(per_image)],
                         "caption": [f"caption {k} of {n}" for n in names for k in range(per_image)]})


def split_of_image(df: pd.DataFrame) -> dict[str, str]:
    per_image = df.groupby("image")["split"].nunique()
    assert per_image.max() == 1, f"images in two splits: {per_image[per_image > 1].index.tolist()[:5]}"
    return dict(zip(df["image"], df["split"]))


def test_hash_splits_are_deterministic_and_respect_fractions():
    df = captions(2000)
    first, second = assign_splits(df, seed=0), assign_splits(df, seed=0)
    assert first["split"].tolist() == second["split"].tolist()
    per_image = pd.Series(split_of_image(first)).value_counts().to_dict()
    assert sum(per_image.values()) == 2000
    # 2,000 draws: train ~ 1800 (sd 13), val and test ~ 100 (sd 10) each.
    assert 1740 <= per_image["train"] <= 1860
    assert 60 <= per_image["val"] <= 140 and 60 <= per_image["test"] <= 140
    assert first.attrs["split_report"]["hashed"] == 2000
    other_seed = assign_splits(df, seed=1)
    assert other_seed["split"].tolist() != first["split"].tolist()
    assert first[["image", "caption_idx", "caption"]].equals(df), "other columns and row order are kept"


def test_hash_splits_match_across_processes_with_different_hash_seeds(tmp_path):
    df = captions(300, per_image=1)
    here = assign_splits(df, fractions=(0.6, 0.2, 0.2), seed=3)["split"].tolist()
    code = ("import sys, json, pandas as pd; from itsim.data.splits import assign_splits; "
            "names = json.loads(sys.stdin.read()); "
            "df = pd.DataFrame({'image': names}); "
            "print(json.dumps(assign_splits(df, fractions=(0.6, 0.2, 0.2), seed=3)['split'].tolist()))")
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], input=json.dumps(df["image"].tolist()),
                                capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=120)
        assert json.loads(result.stdout) == here


def test_karpathy_source_splits_are_kept_with_restval_as_train(tmp_path):
    data = {"images": [
        {"filename": f"img{i}.jpg", "split": split, "sentences": [{"raw": f"caption {k}"} for k in range(5)]}
        for i, split in enumerate(["train", "restval", "val", "test", "restval", "test"])]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    df, _ = read_captions(path)
    out = assign_splits(df, fractions=(0.0, 0.0, 1.0))  # hash would put all in test: source must win
    assert split_of_image(out) == {"img0.jpg": "train", "img1.jpg": "train", "img2.jpg": "val",
                                   "img3.jpg": "test", "img4.jpg": "train", "img5.jpg": "test"}
    assert out.attrs["split_report"]["source"] == 6 and out.attrs["split_report"]["hashed"] == 0


def test_conflicting_and_partial_source_splits_never_leak():
    df = pd.DataFrame({"image": ["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.jpg", "c.jpg", "d.jpg"],
                       "caption": list("1234567"),
                       "split": ["val", "train", None, "dev", "test", "test", None]})
    out = assign_splits(df, fractions=(1.0, 0.0, 0.0))
    assert split_of_image(out) == {"a.jpg": "val", "b.jpg": "val", "c.jpg": "test", "d.jpg": "train"}
    report = out.attrs["split_report"]
    assert (report["conflicts"], report["source"], report["hashed"]) == (1, 3, 1)


def test_val_images_are_exactly_val_and_the_rest_split_train_test():
    df = captions(2000, per_image=2)
    df["split"] = "val"  # source splits are ignored when a val list is given
    names = sorted(set(df["image"]))
    val = set(names[:150]) | {"not_in_table.jpg"}
    out = assign_splits(df, fractions=(0.8, 0.1, 0.1), seed=0, val_images=val)
    splits = split_of_image(out)
    assert {n for n, s in splits.items() if s == "val"} == set(names[:150])
    rest = pd.Series([s for n, s in splits.items() if n not in val]).value_counts().to_dict()
    assert set(rest) == {"train", "test"}
    # 1,850 images at train:test = 0.8:0.1 -> test ~ 206 (sd 13).
    assert 150 <= rest["test"] <= 265 and rest["train"] + rest["test"] == 1850
    report = out.attrs["split_report"]
    assert (report["val_list"], report["val_images_not_found"], report["hashed"]) == (150, 1, 1850)
    assert out.attrs["split_report"]["val_images"] == 150


@pytest.mark.parametrize("fractions, message", [
    ((0.9, 0.05), "three numbers"),
    ((0.9, -0.05, 0.15), "non-negative"),
    ((0.9, 0.05, 0.06), "sum to 1"),
    ((float("nan"), 0.5, 0.5), "finite"),
])
def test_bad_fractions_are_refused(fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(captions(3), fractions=fractions)


def test_fractions_summing_to_one_within_tolerance_are_accepted():
    out = assign_splits(captions(10), fractions=(0.7, 0.2, 0.1 + 5e-7))
    assert set(out["split"]) <= {"train", "val", "test"}
