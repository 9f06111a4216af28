"""The model: encoders, head and forward agree; the model directory round-trips; the folded head is exact."""
from __future__ import annotations

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
