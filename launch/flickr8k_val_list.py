"""Write a val image list for measurement runs: every image of a labelled pair file that this copy has,
plus random other captioned images (fixed seed) up to N.

    python launch/flickr8k_val_list.py DATA_DIR OUT_FILE [N=1000] [SEED=0]

With the shared Flickr8k copy: the 182 present images of itm_dev.tsv + 818 others = 1,000 names,
one per line (sorted), for `itsim build-shards --val-images OUT_FILE`.
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path


def main(data: str, out: str, n: int = 1000, seed: int = 0) -> None:
    root = Path(data)
    with (root / "captions.txt").open(newline="", encoding="utf-8") as f:
        captioned = sorted({row["image"] for row in csv.DictReader(f) if (root / "images" / row["image"]).is_file()})
    dev = sorted({line.split("\t")[0] for line in (root / "itm_dev.tsv").read_text().splitlines() if line.strip()})
    chosen = [name for name in dev if name in set(captioned)]
    rest = [name for name in captioned if name not in set(chosen)]
    chosen += random.Random(seed).sample(rest, max(0, n - len(chosen)))
    Path(out).write_text("\n".join(sorted(chosen)) + "\n")
    print(f"{len(chosen)} val images ({sum(name in set(dev) for name in chosen)} from itm_dev.tsv) -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:5]))
