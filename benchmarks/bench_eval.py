"""Retrieval evaluation: encode every image and caption once, against scoring every pair through the model.

itsim (`itsim eval`'s path): `encode_images` for the images, `encode_captions` for the captions
(packed LSTM), then `score_all_pairs` runs only the fusion head (its first layer split into an image
part and a caption part) over every image x caption. The baseline sends every pair through the whole
model (CNN, LSTM and head per pair, batches of 64 as the reference's inference). The baseline is far
too slow to run in full (5,000,000 pairs at tens of pairs/s): it is timed on a slice of pairs and its
rate extrapolated to every pair, and the JSON lines say so (`extrapolated`).

Images are random uint8 pixels (a CNN costs the same whatever the pixels); captions are synthetic
ones of realistic lengths (the packed LSTM's cost depends on them). The model has the reference
sizes with random weights, in eval mode, fp32 on CPU.
"""
from __future__ import annotations

import time

import numpy as np

import common

# mode -> images, captions per image, image size, baseline pairs per repeat, repeats, tiny model
SIZES = {"tiny": (20, 5, 32, 64, 1, True), "quick": (200, 5, 299, 64, 2, False),
         "full": (1000, 5, 299, 128, 2, False)}
BASELINE_BATCH = 64


def captions(n_images: int, per_image: int, seed: int = 0) -> list[str]:
    """Synthetic captions (no pixels drawn): the same generator as the demo data."""
    from itsim.data.synth.writer import make_captions, make_scene

    out = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        out += make_captions(make_scene(rng, 96, 160), rng, per_image)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from itsim.model import score_all_pairs
    from itsim.model import ItsimModel, ModelConfig, encode_captions, encode_images
    from itsim.text import Vocab

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.setup_logging()
    mode = common.mode_of(args)
    n_img, per_image, size, slice_pairs, repeats, tiny = SIZES[mode]
    repeats = args.repeats or repeats
    rec = common.Recorder("eval", mode, args.out, **({"run_id": args.run_id} if args.run_id else {}))
    rec.machine()
    texts = captions(n_img, per_image)
    vocab = Vocab.build(texts)
    ids_np, lengths_np = vocab.encode(texts, 100)
    ids, lengths = torch.from_numpy(ids_np), torch.from_numpy(lengths_np)
    images = torch.randint(0, 256, (n_img, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=len(vocab), **(common.TINY_MODEL if tiny else {}))).eval()
    cpu = torch.device("cpu")
    n_cap, n_pairs = len(texts), n_img * len(texts)

    torch.manual_seed(0)
    product = ItsimModel(ModelConfig(vocab_size=len(vocab), fusion="concat_product",
                                     **(common.TINY_MODEL if tiny else {}))).eval()

    def encode_once() -> tuple[float, float, float, float]:
        t_img, img_vecs = common.timed(lambda: encode_images(model, images, cpu, batch_size=64))
        t_txt, cap_vecs = common.timed(lambda: encode_captions(model, ids, lengths, cpu, batch_size=1024))
        t_head, matrix = common.timed(lambda: score_all_pairs(model, img_vecs, cap_vecs))
        assert matrix.shape == (n_img, n_cap)
        # The concat_product head (the demo's and the Flickr8k recipe's) over the same vectors: its extra
        # bilinear term cannot be folded into per-image and per-caption parts.
        t_product, matrix = common.timed(lambda: score_all_pairs(product, img_vecs, cap_vecs))
        assert matrix.shape == (n_img, n_cap)
        return t_img, t_txt, t_head, t_product

    gen = np.random.default_rng(1)

    @torch.inference_mode()
    def every_pair_slice() -> float:
        """Pairs/s of the whole model over a random slice of image x caption pairs."""
        img_idx = torch.from_numpy(gen.integers(0, n_img, slice_pairs))
        cap_idx = torch.from_numpy(gen.integers(0, n_cap, slice_pairs))
        start = time.perf_counter()
        for lo in range(0, slice_pairs, BASELINE_BATCH):
            i, c = img_idx[lo:lo + BASELINE_BATCH], cap_idx[lo:lo + BASELINE_BATCH]
            model(images[i], ids[c], lengths[c])
        return slice_pairs / (time.perf_counter() - start)

    with torch.inference_mode():  # warm-up on a little of each
        model(images[:8], ids[:8], lengths[:8])
        score_all_pairs(model, encode_images(model, images[:8], cpu), encode_captions(model, ids[:40], lengths[:40], cpu))
    parts: list[tuple[float, float, float, float]] = []
    baseline: list[float] = []
    for _ in range(repeats):
        parts.append(encode_once())
        baseline.append(every_pair_slice())
    params = {"images": n_img, "captions": n_cap, "pairs": n_pairs, "image_size": size,
              "model": "tiny" if tiny else "reference sizes", "mean_caption_tokens": float(lengths_np.mean())}
    rec.measure("encode once: image encoder", "seconds", "s", [p[0] for p in parts], **params)
    rec.measure("encode once: caption encoder", "seconds", "s", [p[1] for p in parts], **params)
    rec.measure("encode once: head over every pair", "seconds", "s", [p[2] for p in parts], **params)
    rec.measure("encode once: head over every pair, concat_product head", "seconds", "s", [p[3] for p in parts],
                **{**params, "fusion": "concat_product"})
    once = rec.measure("encode once (itsim eval)", "pairs/s", "pairs/s", [n_pairs / sum(p[:3]) for p in parts],
                       **params)
    rec.info("encode once (itsim eval)", "retrieval seconds", "s", n_pairs / once["value"], **params)
    every = rec.measure("every pair through the model (slice)", "pairs/s", "pairs/s", baseline,
                        slice_pairs=slice_pairs, batch=BASELINE_BATCH, **params)
    rec.info("every pair through the model", "retrieval seconds (extrapolated)", "s", n_pairs / every["value"],
             extrapolated=True, from_pairs=slice_pairs * repeats, **params)
    rec.ratio("encode once vs every pair (extrapolated)", once, every,
              note=f"baseline timed on {slice_pairs} random pairs per repeat, extrapolated to {n_pairs:,}")
    return common.finish(rec)


if __name__ == "__main__":
    raise SystemExit(main())
