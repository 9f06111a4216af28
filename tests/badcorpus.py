"""The bad-input corpus: every kind of broken or unusual image and caption row a user sends us.

Written at test time (never committed as binaries) by `write_corpus(root)`:
- `root/images/` with one file per image case (plus `root/outside.jpg`, which names try to reach);
- `root/captions.csv`: one row per case in the Kaggle Flickr8k layout (`image,caption`), saved as
  UTF-8 with a BOM and CRLF line ends, with one Latin-1 byte in one caption: the input of
  `itsim build-shards`;
- `root/pairs.csv`: the same rows (BOM, CRLF) without the Latin-1 one: the input of `itsim score`;
- `root/latin1.csv` (a header, the Latin-1 row, one good row) and `root/latin1_late.csv` (the same
  row after 300 good ones, past the first 8 KB): the scorer's non-UTF-8 case, kept apart because
  it fails the whole file (see tests/test_bad_inputs.py).

Each `Case` says what each tool must make of its row: `ok` (converted / scored), the reason it is
recorded with, or for build-shards `reader:<reason>` when the caption reader itself skips the row.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

LATIN1_CAPTION = b"A caf\xe9 with red chairs on the street"
LONG_CAPTION = ("a dog runs on the green grass near a lake " * 240)[:10_000]
UNICODE_NAME = "a photo ünïcödé 写真.jpg"


@dataclasses.dataclass(frozen=True)
class Case:
    """One input row. `image` may hold `{root}`, replaced by the corpus folder when written."""

    name: str
    image: str
    caption: str = "a small picture of something"
    shards: str = "ok"  # build-shards: ok | failure reason | reader:<reason>
    score: str = "ok"  # itsim score: ok | error of the output row
    line_text: str | None = None  # the CSV line when it is not `image,caption`
    stored: str | None = None  # the caption build-shards keeps, when it is not `caption`


CASES: tuple[Case, ...] = (
    # ---- images ----
    Case("plain JPEG", "good.jpg"),
    Case("missing file", "missing.jpg", shards="missing", score="missing"),
    Case("zero-byte file", "zero.jpg", shards="empty_file", score="empty_file"),
    Case("truncated JPEG", "truncated.jpg", shards="decode_error", score="decode_error"),
    Case("random bytes named .jpg", "random.jpg", shards="not_an_image", score="not_an_image"),
    Case("PNG named .jpg", "png_named.jpg"),
    Case("animated GIF", "anim.gif"),
    Case("CMYK JPEG", "cmyk.jpg"),
    Case("grayscale JPEG", "gray.jpg"),
    Case("16-bit grayscale PNG", "gray16.png"),
    Case("RGBA PNG", "rgba.png"),
    Case("palette PNG with transparency", "palette.png"),
    Case("EXIF-rotated JPEG", "exif6.jpg"),
    Case("1x1 image", "one.png"),
    Case("20000x4 image", "wide.png"),
    Case("decompression bomb (20000x20000 1-bit PNG)", "bomb.png", shards="too_many_pixels", score="too_many_pixels"),
    Case("TIFF whose second frame has no size", "noframe.tif", shards="decode_error", score="decode_error"),
    Case("folder named like an image", "folder.jpg", shards="not_a_file", score="not_a_file"),
    Case("symlink escaping the image root", "link_out.jpg", shards="path_escape", score="path_escape"),
    Case("../ escaping the image root", "../outside.jpg", shards="path_escape", score="path_escape"),
    Case("absolute path outside the root", "{root}/outside.jpg", shards="path_escape", score="path_escape"),
    Case("name with spaces and unicode", UNICODE_NAME),
    Case("row without an image name", "", shards="reader:missing_image", score="bad_name"),
    # ---- captions ----
    Case("empty caption", "cap_empty.jpg", "", shards="reader:empty_caption", score="empty_caption"),
    Case("whitespace-only caption", "cap_space.jpg", "   \t  ", shards="reader:empty_caption", score="empty_caption"),
    Case("10,000-character caption", "cap_long.jpg", LONG_CAPTION),
    Case("non-UTF-8 byte in the caption", "cap_latin1.jpg", LATIN1_CAPTION.decode("latin-1"),
         score="not_scored_here", stored=LATIN1_CAPTION.decode("utf-8", errors="replace")),
    Case("caption of punctuation only", "cap_punct.jpg", "?! ... --- ;; !!", shards="empty_caption",
         score="empty_caption"),
    Case("row with a missing delimiter", "cap_nodelim.jpg", "a dog without a comma",
         line_text="cap_nodelim.jpg a dog without a comma", score="bad_row"),
    Case("row with extra columns", "cap_extra.jpg", "a cat on a mat", line_text="cap_extra.jpg,a cat on a mat,extra",
         stored="a cat on a mat,extra", score="bad_row"),
)


@dataclasses.dataclass
class Corpus:
    root: Path
    images: Path
    captions: Path  # every case, UTF-8 with BOM + CRLF + one Latin-1 byte (build-shards)
    pairs: Path  # every case but the Latin-1 one (score)
    latin1: Path  # header + the Latin-1 row + one good row
    latin1_late: Path  # header + 300 good rows + the Latin-1 row + one good row
    lines: dict[str, int]  # case name -> 1-based line in `captions`

    def image_name(self, case: Case) -> str:
        return case.image.replace("{root}", str(self.root))


def smooth(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, 3)
    arr = base + np.stack([50 * x / width, 50 * y / height, 30 * (x + y) / (width + height)], -1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20000) -> bytes:
    """A real, valid 1-bit PNG of side x side black pixels: ~50 KB that decode to 400 Mpx."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row) for _ in range(side)]
    idat = b"".join(chunks) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def tiff_without_second_frame_size() -> bytes:
    """A valid 8x6 TIFF whose next-IFD pointer leads to a frame without ImageWidth.

    PIL raised TypeError("Missing dimensions") from `n_frames` on it (found by fuzzing).
    """
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    next_at = ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0]
    data += b"\0" * (len(data) % 2)
    data[next_at:next_at + 4] = struct.pack("<I", len(data))
    data += struct.pack("<H", 1) + struct.pack("<HHII", 257, 4, 1, 1) + struct.pack("<I", 0)  # ImageLength only
    return bytes(data)


def _write_images(root: Path, images: Path) -> None:
    smooth(0).save(images / "good.jpg", quality=92)
    (images / "zero.jpg").write_bytes(b"")
    full = io.BytesIO()
    smooth(1, 200, 150).save(full, format="JPEG")
    (images / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (images / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4000))
    smooth(2).save(images / "png_named.jpg", format="PNG")
    frames = [smooth(3), smooth(4)]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    smooth(5).convert("L").save(images / "gray.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(images / "gray16.png")
    rgba = smooth(6).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))
    rgba.save(images / "rgba.png")
    palette = smooth(7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(images / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth(8, 60, 30).save(images / "exif6.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(images / "one.png")
    Image.new("RGB", (20000, 4), (10, 200, 10)).save(images / "wide.png")
    (images / "bomb.png").write_bytes(png_bomb())
    (images / "noframe.tif").write_bytes(tiff_without_second_frame_size())
    (images / "folder.jpg").mkdir()
    smooth(9).save(root / "outside.jpg")
    (images / "link_out.jpg").symlink_to(root / "outside.jpg")
    smooth(10).save(images / UNICODE_NAME)
    for i, name in enumerate(("cap_empty", "cap_space", "cap_long", "cap_latin1", "cap_punct", "cap_nodelim",
                              "cap_extra")):
        smooth(20 + i).save(images / f"{name}.jpg")


def _line(case: Case, root: Path) -> bytes:
    if case.caption == LATIN1_CAPTION.decode("latin-1"):
        return case.image.encode() + b"," + LATIN1_CAPTION
    text = case.line_text if case.line_text is not None else f"{case.image},{case.caption}"
    return text.replace("{root}", str(root)).encode("utf-8")


def write_corpus(root: str | Path) -> Corpus:
    """Write the images and caption files under `root` (which must not contain a comma)."""
    root = Path(root)
    assert "," not in str(root), "the absolute-path case writes the root into a CSV cell"
    images = root / "images"
    images.mkdir(parents=True)
    _write_images(root, images)
    header = b"image,caption"
    lines = [_line(case, root) for case in CASES]
    captions = root / "captions.csv"
    captions.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([header, *lines]) + b"\r\n")
    latin1_index = next(i for i, c in enumerate(CASES) if c.score == "not_scored_here")
    pairs = root / "pairs.csv"
    kept = [line for i, line in enumerate(lines) if i != latin1_index]
    pairs.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([header, *kept]) + b"\r\n")
    latin1 = root / "latin1.csv"
    after = b"good.jpg,a good row after it"
    latin1.write_bytes(b"\n".join([header, lines[latin1_index], after]) + b"\n")
    latin1_late = root / "latin1_late.csv"
    before = [b"good.jpg,good row number %d before the Latin-1 one" % i for i in range(300)]
    latin1_late.write_bytes(b"\n".join([header, *before, lines[latin1_index], after]) + b"\n")
    return Corpus(root, images, captions, pairs, latin1, latin1_late, {c.name: i + 2 for i, c in enumerate(CASES)})


if __name__ == "__main__":  # write a corpus to look at: python tests/badcorpus.py /tmp/corpus
    import sys

    corpus = write_corpus(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "badcorpus"))
    print(f"{len(CASES)} cases written to {corpus.root}")
