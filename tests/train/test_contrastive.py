"""The contrastive (ITC + ITM) options: pooled caption vectors, the shared projections, the InfoNCE loss,
negatives mined from the similarities, word dropout, the extra augmentations, re-ranked retrieval, and
exact resume of a run that uses them all."""
from __future__ import annotations

import json
import math
import signal
import subprocess

import pytest
import torch

from itsim.data.pairs import drop_words, in_batch_negatives, step_generator
from itsim.model import ItsimModel, ModelConfig, Preprocess, load_model, save_model
from itsim.model.export import UnpackedTextEncoder
from itsim.text import Vocab
from itsim.train.augment import augment, parse_ops
from itsim.train.objective import itc_loss
from test_train import ENV, _params, _train_cmd, _wait_for

CONTRASTIVE = ["--contrastive-dim", "16", "--itc-weight", "1", "--negatives", "itc", "--pairs", "in-batch",
               "--negatives-k", "3", "--text-pool", "mean", "--word-dropout", "0.1", "--augment", "rrc,jitter"]


def _tiny(**kw) -> ItsimModel:
    torch.manual_seed(0)
    return ItsimModel(ModelConfig(vocab_size=40, channels=(8,), image_dim=24, embed_dim=8, lstm_hidden=8,
                                  lstm_layers=2, text_dim=12, head_dim=8, **kw)).eval()


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_caption_vectors_ignore_padding_and_export_unpacked(pool):
    model = _tiny(text_pool=pool)
    ids = torch.randint(2, 40, (5, 9))
    lengths = torch.tensor([9, 1, 4, 6, 2])
    ids[torch.arange(9)[None, :] >= lengths[:, None]] = 0
    with torch.inference_mode():
        vec = model.encode_text(ids, lengths)
        assert vec.shape == (5, 12)
        wider = torch.cat([ids, torch.zeros(5, 7, dtype=ids.dtype)], 1)
        assert torch.allclose(model.encode_text(wider, lengths), vec, atol=1e-6)
        assert torch.allclose(model.encode_text(ids[1:2, :1], lengths[1:2]), vec[1:2], atol=1e-6)
        assert torch.allclose(UnpackedTextEncoder(model.text_encoder).eval()(ids, lengths), vec, atol=1e-5)
    with pytest.raises(ValueError, match="text_pool"):
        _tiny(text_pool="sum")


def test_similarity_shapes_select_forward_and_save_load(tmp_path):
    model = _tiny(contrastive_dim=6, text_pool="max")
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    ids, lengths = torch.randint(2, 40, (7, 5)), torch.tensor([5, 3, 1, 2, 5, 4, 4])
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids, lengths)
        sim = model.similarity(img, txt)
        assert sim.shape == (3, 7)
        assert sim.abs().max() <= math.exp(model.logit_scale.item()) + 1e-4  # scaled cosines
        chosen = (torch.tensor([0, 2, 1]), torch.tensor([6, 0, 3]))
        logits, sim2 = model(images, ids, lengths, select=lambda s: chosen)
        assert torch.allclose(sim2, sim) and logits.shape == (3,)
        assert torch.allclose(logits, model.head(img[chosen[0]], txt[chosen[1]]))
    vocab = Vocab.build(["w%d" % i for i in range(38)], min_count=1)
    save_model(tmp_path / "m", model, vocab, Preprocess(image_size=16))
    loaded, _, _ = load_model(tmp_path / "m")
    assert loaded.cfg.contrastive_dim == 6 and loaded.cfg.text_pool == "max"
    with torch.no_grad():
        assert torch.equal(loaded.similarity(img, txt), sim)


def test_itc_loss_rewards_the_own_captions_and_is_symmetric():
    positive = torch.zeros(3, 6, dtype=torch.bool)
    for i in range(3):
        positive[i, 2 * i:2 * i + 2] = True  # two captions per image
    aligned = torch.where(positive, 20.0, -20.0)
    assert itc_loss(aligned, positive) < 0.35  # rows: log(2) (the target is split over 2 positives), columns: 0
    assert itc_loss(aligned, positive) > math.log(2) * 0.5 - 1e-4
    flat = torch.zeros(3, 6)
    expected = 0.5 * (math.log(6) + math.log(3))  # soft-target cross-entropies of uniform softmaxes
    assert itc_loss(flat, positive).item() == pytest.approx(expected, rel=1e-6)
    assert itc_loss(-aligned, positive) > 10


def test_itc_negatives_follow_the_similarities_and_never_pick_positives():
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[:, :2] = False
    scores = torch.zeros(4, 10)
    scores[:, 7] = 50.0  # one caption far more similar than the rest: always drawn
    idx, usable = in_batch_negatives(scores, valid, 3, "itc", gen)
    assert idx.shape == (4, 3) and usable.all()
    assert (idx >= 2).all() and (idx == 7).any(dim=1).all()
    assert all(len(set(row.tolist())) == 3 for row in idx)  # without replacement
    few = torch.zeros(4, 10, dtype=torch.bool)
    few[:, 0] = True
    idx, usable = in_batch_negatives(scores, few, 3, "itc", gen)
    assert usable.sum(1).tolist() == [1, 1, 1, 1] and (idx[usable] == 0).all()
    with pytest.raises(ValueError, match="itc negatives need"):
        in_batch_negatives(None, valid, 3, "itc", gen)


def test_word_dropout_only_touches_words_within_the_length():
    ids = torch.arange(2, 62).view(6, 10)
    lengths = torch.tensor([10, 3, 1, 5, 7, 2])
    dropped = drop_words(ids, lengths, 0.5, step_generator(0, 1, 0))
    inside = torch.arange(10)[None, :] < lengths[:, None]
    assert torch.equal(dropped[~inside], ids[~inside])
    assert ((dropped == 1) | (dropped == ids)).all() and 0 < int((dropped == 1).sum()) < int(inside.sum())
    assert torch.equal(drop_words(ids, lengths, 0.0, step_generator(0, 1, 0)), ids)


def test_rrc_and_jitter_are_batched_repeatable_and_in_range():
    images = torch.rand(6, 3, 20, 20)
    ops = parse_ops("rrc,flip,jitter")
    a = augment(images, ops, step_generator(0, 3, 0))
    b = augment(images, ops, step_generator(0, 3, 0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, images)
    jitter_only = augment(images, parse_ops("jitter"), step_generator(0, 4, 0))
    assert jitter_only.shape == images.shape and 0 <= jitter_only.min() and jitter_only.max() <= 1


def test_contrastive_training_lowers_the_loss_and_logs_retrieval(tiny_shards, tmp_path):
    from itsim.train import TrainConfig, train

    summary = train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), steps=60, batch_size=16,
                                lr=3e-3, warmup_steps=5, pairs="in-batch", negatives="itc", negatives_k=3,
                                itc_weight=1.0, contrastive_dim=16, text_pool="mean", word_dropout=0.05,
                                workers=0, threads=1, eval_every=0, log_every=10, checkpoint_every=1000,
                                tensorboard=False, channels=(8, 16), embed_dim=16, lstm_hidden=16, lstm_layers=1,
                                text_dim=32, image_dim=32, head_dim=16))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3, losses
    assert {"val_itc_i2t_r10", "val_itc_t2i_r10"} <= set(summary)


def test_itc_options_without_projections_are_refused(tiny_shards, tmp_path):
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "r", "--itc-weight", "1"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--contrastive-dim" in done.stderr and "Traceback" not in done.stderr


def test_itc_retrieval_reranked_over_every_candidate_is_the_heads_ranking(tiny_shards, tmp_path):
    from itsim.train import TrainConfig, train
    from itsim.eval.evaluate import EvalConfig, evaluate

    run = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), steps=8, batch_size=16, warmup_steps=2,
                      pairs="in-batch", itc_weight=1.0, contrastive_dim=16, workers=0, threads=1, eval_every=0,
                      tensorboard=False, channels=(8,), embed_dim=8, lstm_hidden=8, lstm_layers=1, text_dim=16,
                      image_dim=16, head_dim=8))
    common = dict(model=str(run / "model"), shards=str(tiny_shards), split="val", plots=False, report=False)
    head = evaluate(EvalConfig(**common, out=str(tmp_path / "head")))
    itc = evaluate(EvalConfig(**common, out=str(tmp_path / "itc"), rank_by="itc"))
    every = evaluate(EvalConfig(**common, out=str(tmp_path / "all"), rank_by="itc", rerank=100000))
    keys = [k for k in head if k.startswith(("i2t_", "t2i_"))]
    assert keys and all(every[k] == pytest.approx(head[k]) for k in keys)
    assert itc["retrieval_rank_by"] == "itc" and 0 <= itc["i2t_r10"] <= 1
    assert itc["roc_auc"] == head["roc_auc"]  # pair metrics stay the head's


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_with_the_contrastive_objective(tiny_shards, tmp_path):
    steps = ["--steps", "12", "--checkpoint-every", "3", *CONTRASTIVE]
    subprocess.run(_train_cmd(tiny_shards, tmp_path / "a", *steps), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tiny_shards, tmp_path / "b", *steps), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(tmp_path / "b" / "checkpoints" / "step_0000003", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model").exists()
    done = subprocess.run(_train_cmd(tiny_shards, tmp_path / "b", *steps, "--resume", "auto"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert "logit_scale" in a and "image_embed.weight" in a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"largest parameter difference {worst}"
