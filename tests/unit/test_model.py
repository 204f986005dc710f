"""Table 1 architecture, initialisation, artifact round trip, AlexNet features."""

import hashlib
import json

import pytest
import torch

from ray_inspect import load_model
from ray_inspect.config import ModelConfig
from ray_inspect.core.model import AlexNetFeatures, ConvAE, ConvVAE
from ray_inspect.io.artifact import ModelCard, load_alexnet, read_card, save_model


def test_table1_shapes():
    m = ConvAE(ModelConfig(latent=100))
    x = torch.rand(2, 1, 128, 128)
    shapes = []
    h = x
    for layer in m.encoder:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 64, 64), (32, 32, 32), (32, 32, 32), (64, 16, 16), (64, 16, 16),
                      (128, 8, 8), (64, 8, 8), (32, 8, 8), (100, 1, 1)]
    assert m(x).shape == x.shape
    assert not isinstance(m.encoder[-1], torch.nn.LeakyReLU)
    assert not isinstance(m.decoder[-1], torch.nn.LeakyReLU)
    acts = [a for a in m.modules() if isinstance(a, torch.nn.LeakyReLU)]
    assert len(acts) == 16 and all(a.negative_slope == 0.2 for a in acts)
    convs = [c for c in m.decoder if not isinstance(c, torch.nn.LeakyReLU)]
    assert all(isinstance(c, torch.nn.ConvTranspose2d) for c in convs)


def test_he_init_passes_the_input_signal():
    torch.manual_seed(0)
    m = ConvAE(ModelConfig()).eval()
    with torch.no_grad():
        a, b = m(torch.rand(8, 1, 128, 128)), m(torch.rand(8, 1, 128, 128))
    # PyTorch's default init leaves ~1e-9 of input dependence (the flat-grey plateau)
    assert (a - b).std() > 1e-2


def test_vae_train_and_eval_outputs():
    vae = ConvVAE(ModelConfig(loss="vae", latent=50))
    x = torch.rand(3, 1, 128, 128)
    recon, mu, logvar = vae.train()(x)
    assert recon.shape == x.shape and mu.shape == (3, 50, 1, 1) and logvar.shape == mu.shape
    assert vae.eval()(x).shape == x.shape


def test_artifact_round_trip_and_card(tmp_path):
    torch.manual_seed(1)
    m = ConvAE(ModelConfig(latent=20))
    url = str(tmp_path / "model")
    card = save_model(url, m, ModelCard(model=ModelConfig(latent=20), threshold=0.3))
    loaded = load_model(url)
    assert not loaded.training and loaded.card.threshold == 0.3 and loaded.card.model.latent == 20
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    data = json.loads((tmp_path / "model" / "card.json").read_text())
    assert data["weights"] == card.weights and data["versions"]["torch"] == torch.__version__
    assert read_card(url).fingerprint == card.fingerprint


def test_load_refuses_pickled_code(tmp_path):
    import pickle

    url = tmp_path / "model"
    card = save_model(str(url), ConvAE(ModelConfig(latent=8)), ModelCard(model=ModelConfig(latent=8)))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    data = pickle.dumps({"x": Evil()})
    (url / card.weights).write_bytes(data)
    card_json = json.loads((url / "card.json").read_text())
    card_json["weights_sha256"] = hashlib.sha256(data).hexdigest()    # a card made to match the file
    (url / "card.json").write_text(json.dumps(card_json))
    with pytest.raises(ValueError, match="Weights only load failed|Unsupported") as raised:
        load_model(str(url))
    assert "\n" not in str(raised.value) and card.weights in str(raised.value)


def test_alexnet_features_from_file(tmp_path):
    net = AlexNetFeatures()
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    # a full torchvision-style state dict also has later layers and a classifier
    state.update({"features.8.weight": torch.zeros(256, 384, 3, 3),
                  "classifier.1.weight": torch.zeros(4096, 9216)})
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    loaded = load_alexnet(str(path))
    feats = loaded(torch.rand(2, 1, 128, 128))
    assert [f.shape[1] for f in feats] == [64, 192, 384]
    assert all(not p.requires_grad for p in loaded.parameters())
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an AlexNet state dict"):
        load_alexnet(str(tmp_path / "bad.pth"))
