"""The model: encoders, head and forward agree; the model directory round-trips; the folded head is exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from itsim.model import ItsimModel, ModelConfig, Preprocess, load_model, save_model
from itsim.text import Vocab


def test_model_encoders_head_and_forward_agree_and_survive_a_save_load(tmp_path):
    vocab = Vocab.build(["a red circle", "a blue square"])
    cfg = ModelConfig(vocab_size=len(vocab), channels=(8, 16), image_dim=32, embed_dim=16, lstm_hidden=16,
                      lstm_layers=3, text_dim=32, head_dim=16)
    model = ItsimModel(cfg).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    ids = torch.tensor(vocab.encode(["a red circle", "blue", ""], 100)[0])
    lengths = torch.tensor(vocab.encode(["a red circle", "blue", ""], 100)[1])
    assert model.encode_image(images).shape == (3, 32)
    assert model.encode_text(ids, lengths).shape == (3, 32)
    with torch.no_grad():
        direct = model(images, ids, lengths)
        matrix = model.score_matrix(model.encode_image(images), model.encode_text(ids, lengths))
    assert direct.shape == (3,)
    assert torch.allclose(matrix.diagonal(), direct, atol=1e-6)
    # Padding to 100 is free: the same caption padded shorter gives the same vector (packed LSTM).
    short = torch.tensor(vocab.encode(["a red circle"], 10)[0])
    assert torch.allclose(model.encode_text(short, lengths[:1]), model.encode_text(ids[:1], lengths[:1]), atol=1e-6)
    save_model(tmp_path / "m", model, vocab, Preprocess(image_size=32))
    loaded, vocab2, pre = load_model(tmp_path / "m")
    assert pre.image_size == 32 and vocab2.words == vocab.words
    with torch.no_grad():
        assert torch.equal(loaded(images, ids, lengths), direct)


@pytest.mark.parametrize("fusion", ["concat", "concat_product"])
def test_score_matrix_equals_the_head_on_every_pair(fusion):
    torch.manual_seed(0)
    model = ItsimModel(ModelConfig(vocab_size=50, channels=(8,), image_dim=24, text_dim=16, embed_dim=8,
                                   lstm_hidden=8, lstm_layers=1, head_dim=12, fusion=fusion)).eval()
    bn = model.fusion.net[1]  # non-trivial running statistics, so the folding is really exercised
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    image_vec, text_vec = torch.randn(7, 24), torch.randn(11, 16)
    with torch.no_grad():
        expected = torch.stack([model.head(image_vec[i:i + 1].expand(11, -1), text_vec) for i in range(7)])
        got = model.score_matrix(image_vec, text_vec, max_elements=64)  # many small chunks
    assert torch.allclose(got, expected, atol=1e-5)


def _tiny(fusion: str = "concat", layers: int = 2) -> ItsimModel:
    torch.manual_seed(0)
    return ItsimModel(ModelConfig(vocab_size=50, channels=(8, 16), image_dim=24, text_dim=16, embed_dim=8,
                                  lstm_hidden=8, lstm_layers=layers, head_dim=12, fusion=fusion))


def _captions(n: int = 9, max_len: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g, dtype=torch.int32)
    ids = torch.randint(2, 50, (n, max_len), generator=g, dtype=torch.int32)
    ids[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def _lstm_dtypes(model: ItsimModel, call) -> tuple[set, set, torch.Tensor]:
    """(parameter dtypes, output dtypes) the LSTM module actually ran with during `call()`, and its result."""
    seen: dict[str, set] = {"params": set(), "outputs": set()}

    def hook(module, args, output):
        seen["params"] |= {p.dtype for p in module.parameters()}
        out, (h, c) = output
        seen["outputs"] |= {out.data.dtype, h.dtype, c.dtype}

    handle = model.text_encoder.lstm.register_forward_hook(hook)
    try:
        result = call()
    finally:
        handle.remove()
    return seen["params"], seen["outputs"], result


@pytest.mark.parametrize("train", [False, True])
def test_lstm_runs_in_fp32_under_bf16_autocast_and_equals_the_fp32_result(train):
    """One code path on every device: autocast off around the LSTM (cuDNN's autocast RNN path may pick
    fp16, oneDNN has none). Under CPU bf16 autocast the LSTM sees fp32 weights and inputs, and the text
    vectors equal the no-autocast ones except for the final projection, which autocast may run in bf16."""
    model = _tiny(layers=3).train(train)
    model.text_encoder.lstm.dropout = 0.0  # same numbers in train mode too
    ids, lengths = _captions()
    params, outputs, plain = _lstm_dtypes(model, lambda: model.text_encoder(ids, lengths))
    assert params == outputs == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params, outputs, mixed = _lstm_dtypes(model, lambda: model.text_encoder(ids, lengths))
    assert params == outputs == {torch.float32}
    model.text_encoder.proj = torch.nn.Identity()  # compare the LSTM's own output exactly
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.text_encoder(ids, lengths)
        plain = model.text_encoder(ids, lengths)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_text_encoder_takes_host_lengths_as_numpy_and_ddp_leaves_them_on_the_host():
    """DDP moves every tensor argument of forward to its device with a blocking copy (a host sync per
    step on a GPU); NumPy lengths pass through untouched and give the same vectors as tensor lengths."""
    from torch.distributed.utils import _to_kwargs

    model = _tiny().eval()
    ids, lengths = _captions()
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids, lengths.numpy()), model.encode_text(ids, lengths))
    moved, _ = _to_kwargs((ids, lengths.numpy(), lengths), {}, torch.device("meta"), False)
    assert moved[0][0].device.type == "meta" and moved[0][2].device.type == "meta"  # tensors would move
    assert isinstance(moved[0][1], np.ndarray)  # the array stays on the host


@pytest.mark.parametrize("fusion", ["concat", "concat_product"])
@pytest.mark.parametrize("train", [False, True])
def test_head_and_score_matrix_under_bf16_autocast_equal_the_fp32_result_exactly(fusion, train):
    """Scoring runs the head in fp32 whatever the caller's autocast: bf16 logits tie, so rankings from a
    GPU would differ from CPU ones and from `itsim eval`. Eval mode uses the folded head, train mode
    the fallback through `model.head`."""
    model = _tiny(fusion).train(train)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    bn = model.fusion.net[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    image_vec, text_vec = torch.randn(7, 24), torch.randn(11, 16)
    with torch.no_grad():
        head32 = model.head(image_vec, text_vec[:7])
        matrix32 = model.score_matrix(image_vec, text_vec, max_elements=64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head16 = model.head(image_vec, text_vec[:7])
            matrix16 = model.score_matrix(image_vec, text_vec, max_elements=64)
            # the same vectors in bf16 (what a bf16 encoder hands over) score like their fp32 values
            from_bf16 = model.score_matrix(image_vec.bfloat16(), text_vec.bfloat16(), max_elements=64)
    assert head16.dtype == matrix16.dtype == torch.float32
    assert torch.equal(head16, head32) and torch.equal(matrix16, matrix32)
    assert torch.equal(from_bf16, model.score_matrix(image_vec.bfloat16().float(), text_vec.bfloat16().float(),
                                                     max_elements=64))


def test_images_to_float_is_nchw_contiguous_unless_channels_last():
    from itsim.model import images_to_float

    images = torch.randint(0, 256, (2, 6, 5, 3), dtype=torch.uint8)
    nchw = images_to_float(images, channels_last=False)
    cl = images_to_float(images, channels_last=True)
    assert nchw.shape == cl.shape == (2, 3, 6, 5) and torch.equal(nchw, cl)
    assert nchw.is_contiguous() and nchw.stride() == (90, 30, 5, 1)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(nchw, images.permute(0, 3, 1, 2).float() / 255)
    # float input (e.g. after augmentation) is brought to the asked format as well
    assert images_to_float(cl, channels_last=False).is_contiguous()
    assert images_to_float(nchw, channels_last=True).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lstm_runs_in_fp32_under_cuda_bf16_autocast():
    model = _tiny(layers=3).cuda().train()
    ids, lengths = _captions()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        params, outputs, vec = _lstm_dtypes(model, lambda: model.text_encoder(ids.cuda(), lengths.numpy()))
    assert params == outputs == {torch.float32}
    vec.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.text_encoder.lstm.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_scores_rank_like_cpu_fp32():
    model = _tiny("concat_product").eval()
    image_vec, text_vec = torch.randn(40, 24), torch.randn(60, 16)
    with torch.no_grad():
        cpu = model.score_matrix(image_vec, text_vec)
        gpu_model = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu = gpu_model.score_matrix(image_vec.cuda(), text_vec.cuda()).cpu()
    assert gpu.dtype == torch.float32
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)  # fp32 on both (TF32 off for matmuls)
    assert (gpu.argsort(dim=1, descending=True)[:, :5] == cpu.argsort(dim=1, descending=True)[:, :5]).float().mean() > 0.95
