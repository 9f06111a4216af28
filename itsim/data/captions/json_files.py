"""JSON caption files: Karpathy split JSON (Flickr8k/30k/COCO) and COCO captions.

Line numbers in the report are 1-based record numbers: the image entry for Karpathy, the
annotation for COCO.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from itsim.data.captions.rows import ReadReport, Rows, split_of
from itsim.errors import UserError


def load_json(text: str, path: Path) -> dict:
    """The parsed file; not JSON, or JSON without an `images` list, is a UserError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise UserError(f"{path}: unrecognised JSON caption file (expected an 'images' list: "
                        "Karpathy split or COCO captions)")
    return obj


def json_format(obj: dict, path: Path) -> str:
    """`coco` (has `annotations`) or `karpathy` (images carry `sentences`)."""
    if isinstance(obj.get("annotations"), list):
        return "coco"
    first = next((e for e in obj["images"] if isinstance(e, dict)), {})
    if "sentences" in first or not obj["images"]:
        return "karpathy"
    raise UserError(f"{path}: unrecognised JSON caption file (images have no 'sentences' and there "
                    "are no 'annotations')")


def read_karpathy(obj: dict, rows: Rows, report: ReadReport, **_: Any) -> None:
    """Karpathy split JSON; `restval` counts as train; COCO's copy puts `filepath/filename`.

    An image entry with no sentences is one skipped row (`no_captions`), so it is not lost unseen.
    """
    for number, entry in enumerate(obj.get("images") or [], 1):
        entry = entry if isinstance(entry, dict) else {}
        name = entry.get("filename") if isinstance(entry.get("filename"), str) else ""
        if name.strip() and isinstance(entry.get("filepath"), str) and entry["filepath"].strip():
            name = f"{entry['filepath'].strip()}/{name.strip()}"
        split = split_of(entry.get("split"), report)
        sentences = entry.get("sentences") if isinstance(entry.get("sentences"), list) else []
        if not sentences:
            report.rows_in += 1
            report.skip("no_captions", number)
        for idx, sent in enumerate(sentences):
            report.rows_in += 1
            sent = sent if isinstance(sent, dict) else {}
            raw, tokens = sent.get("raw"), sent.get("tokens")
            if (not isinstance(raw, str) or not raw.strip()) and isinstance(tokens, list) and tokens:
                rows.add_recovered("raw_from_tokens", name, " ".join(map(str, tokens)), number, idx, split)
            else:
                rows.add(name, raw, number, idx, split)


def read_coco(obj: dict, rows: Rows, report: ReadReport, **_: Any) -> None:
    """COCO captions JSON; caption_idx is the annotation's order within its image."""
    names = {img.get("id"): img.get("file_name") for img in obj.get("images") or [] if isinstance(img, dict)}
    with_captions = set()
    for number, ann in enumerate(obj.get("annotations") or [], 1):
        report.rows_in += 1
        ann = ann if isinstance(ann, dict) else {}
        if ann.get("image_id") not in names:
            report.skip("unknown_image_id", number)
            continue
        if rows.add(names[ann["image_id"]] or "", ann.get("caption"), number):
            with_captions.add(ann["image_id"])
    if len(names) > len(with_captions):
        report.note("images_without_captions", len(names) - len(with_captions))
