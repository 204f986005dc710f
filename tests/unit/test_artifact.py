"""The model card: one scale factor for every image, the score options, the normaliser file."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_inspect.config import ModelConfig, ScoreConfig
from ray_inspect.core.model import build_model
from ray_inspect.core.scoring import (
    N_FEATURES,
    N_IMAGE_FEATURES,
    FeaturePositionStats,
    FeatureStats,
    PositionStats,
)
from ray_inspect.io.artifact import (
    ModelCard,
    load_model,
    load_normaliser,
    read_card,
    save_model,
    save_normaliser,
    write_card,
)
from ray_inspect.io.images import scaled_shape


def test_one_factor_scales_every_image_keeping_its_aspect_ratio():
    card = ModelCard(model=ModelConfig(), resize=None, scale=0.512)
    assert card.processing_shape(500, 1250) == (256, 640)
    assert card.processing_shape(500, 1270) == (256, 650)          # another size, the same factor
    assert card.processing_shape(1024, 1024) == (524, 524)
    paper = ModelCard(model=ModelConfig(), scale=0.25)
    assert paper.processing_shape(1024, 1024) == (256, 256)          # the paper's
    assert ModelCard(model=ModelConfig(), scale=1.0).processing_shape(37, 91) == (37, 91)
    assert scaled_shape(3, 3, 0.1) == (1, 1)


def test_an_older_card_reads_and_writes_exactly_as_before():
    old = ModelCard(model=ModelConfig(), resize=256, source_size=(512, 512), threshold=0.25)
    text = json.loads(old.to_json())
    assert not {"scale", "score", "normaliser", "normaliser_sha256"} & set(text)
    loaded = ModelCard.from_json(old.to_json())
    assert loaded == old and loaded.score == ScoreConfig() and loaded.fingerprint == old.fingerprint


def test_score_options_round_trip_and_change_the_fingerprint():
    card = ModelCard(model=ModelConfig(), resize=None, scale=0.5, threshold=2.0, score_range=(0.0, 64.0),
                     score=ScoreConfig(smooth_sigma=4.0, normalise="position"), normaliser="n.npz",
                     normaliser_sha256="ab")
    again = ModelCard.from_json(card.to_json())
    assert again == card
    other = ModelCard.from_json(card.to_json().replace('"smooth_sigma": 4.0', '"smooth_sigma": 2.0'))
    assert other.score.smooth_sigma == 2.0 and other.fingerprint != card.fingerprint
    # a card written before contrast adaptation existed reads as adaptation 0, with its fingerprint
    features = ModelCard(**{**card.__dict__, "score": ScoreConfig(smooth_sigma=3.0, normalise="features")})
    older = json.loads(features.to_json())
    del older["score"]["adapt_contrast"]
    assert ModelCard.from_json(json.dumps(older)) == features
    key = [features.weights_sha256, features.resize, features.source_size, features.threshold,
           json.loads(features.to_json())["model"], 0.5, {"smooth_sigma": 3.0, "normalise": "features"}, "ab"]
    assert features.fingerprint == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    adapted = ModelCard(**{**features.__dict__, "score": ScoreConfig(3.0, "features", adapt_contrast=0.5)})
    assert ModelCard.from_json(adapted.to_json()) == adapted and adapted.fingerprint != features.fingerprint


def _small_model(tmp_path) -> tuple[str, ModelCard]:
    url = str(tmp_path / "m")
    cfg = ModelConfig()
    torch.manual_seed(0)
    return url, save_model(url, build_model(cfg), ModelCard(model=cfg, resize=None, scale=0.5))


def test_normaliser_file_round_trips_and_is_checked(tmp_path):
    url, card = _small_model(tmp_path)
    rng = np.random.default_rng(0)
    stats = PositionStats(rng.random((6, 9)).astype(np.float32), 0.1 + rng.random((6, 9)).astype(np.float32))
    name, sha = save_normaliser(url, stats)
    write_card(url, card.__class__(**{**card.__dict__, "normaliser": name, "normaliser_sha256": sha,
                                      "score": ScoreConfig(normalise="position")}))
    loaded = load_model(url).normaliser
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.std, stats.std)
    (tmp_path / "m" / name).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        load_normaliser(url, read_card(url))


def test_feature_statistics_round_trip_and_a_file_of_the_other_kind_is_one_line(tmp_path):
    url, card = _small_model(tmp_path)
    rng = np.random.default_rng(1)
    whiten = np.tril(rng.random((N_FEATURES, N_FEATURES))) + np.eye(N_FEATURES)
    stats = FeatureStats(rng.random(N_FEATURES), whiten)
    name, sha = save_normaliser(url, stats)
    as_card = card.__class__(**{**card.__dict__, "normaliser": name, "normaliser_sha256": sha,
                                "score": ScoreConfig(normalise="features")})
    write_card(url, as_card)
    loaded = load_model(url).normaliser
    assert isinstance(loaded, FeatureStats)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.whiten, stats.whiten)
    # the same file under a card that expects position statistics: named, not a KeyError
    write_card(url, as_card.__class__(**{**as_card.__dict__, "score": ScoreConfig(normalise="position")}))
    with pytest.raises(ValueError, match=r"n?ormaliser-.*not a position normaliser file"):
        load_normaliser(url, read_card(url))
    position = PositionStats(np.ones((4, 5), np.float32), np.full((4, 5), 0.5, np.float32))
    pair = FeaturePositionStats(stats, position)
    name, sha = save_normaliser(url, pair)
    write_card(url, as_card.__class__(**{**as_card.__dict__, "normaliser": name, "normaliser_sha256": sha,
                                         "score": ScoreConfig(normalise="features+position")}))
    loaded = load_model(url).normaliser
    assert isinstance(loaded, FeaturePositionStats)
    np.testing.assert_array_equal(loaded.features.whiten, stats.whiten)
    np.testing.assert_array_equal(loaded.position.std, pair.position.std)
    bad = FeatureStats(np.full(N_FEATURES, np.nan), np.eye(N_FEATURES))
    name, sha = save_normaliser(url, bad)
    write_card(url, as_card.__class__(**{**as_card.__dict__, "normaliser": name, "normaliser_sha256": sha,
                                         "score": ScoreConfig(normalise="features")}))
    with pytest.raises(ValueError, match="malformed"):
        load_normaliser(url, read_card(url))


def test_contrast_adaptation_round_trips_and_must_match_the_card(tmp_path):
    url, card = _small_model(tmp_path)
    rng = np.random.default_rng(2)
    whiten = np.tril(rng.random((N_FEATURES, N_FEATURES))) + np.eye(N_FEATURES)
    stats = FeatureStats(rng.random(N_FEATURES), whiten, 0.5, 0.1 + rng.random(N_IMAGE_FEATURES))

    def as_card(st, adapt, normalise="features"):
        name, sha = save_normaliser(url, st)
        write_card(url, card.__class__(**{**card.__dict__, "normaliser": name, "normaliser_sha256": sha,
                                          "score": ScoreConfig(3.0, normalise, adapt)}))
        return read_card(url)

    loaded = load_normaliser(url, as_card(stats, 0.5))
    assert loaded.adapt == 0.5
    np.testing.assert_array_equal(loaded.reference, stats.reference)
    position = PositionStats(np.ones((2, 3)), np.ones((2, 3)))
    pair = load_normaliser(url, as_card(FeaturePositionStats(stats, position), 0.5, "features+position"))
    np.testing.assert_array_equal(pair.features.reference, stats.reference)
    with pytest.raises(ValueError, match=r"normaliser-.*adaptation 0.5, the card says 0$"):
        load_normaliser(url, as_card(stats, 0.0))
    plain = FeatureStats(stats.mean, stats.whiten)
    with pytest.raises(ValueError, match=r"normaliser-.*adaptation 0, the card says 0.5$"):
        load_normaliser(url, as_card(plain, 0.5))
    bad = FeatureStats(stats.mean, stats.whiten, 0.5, np.zeros(N_IMAGE_FEATURES))
    with pytest.raises(ValueError, match=r"normaliser-.*contrast reference is malformed$"):
        load_normaliser(url, as_card(bad, 0.5))
    # a reader that knows no adaptation finds no "whiten" and refuses the file rather than misread it
    name, _ = save_normaliser(url, stats)
    with np.load(tmp_path / "m" / name) as z:
        assert "whiten" not in z.files and "whiten_adapted" in z.files
    with pytest.raises(ValueError, match="contrast adaptation needs 12 reference spreads"):
        FeatureStats(stats.mean, stats.whiten, 0.5)


@pytest.fixture
def saved(tmp_path):
    """A small model directory: (URL, card)."""
    torch.manual_seed(0)
    cfg = ModelConfig(latent=8)
    url = str(tmp_path / "m")
    return url, save_model(url, build_model(cfg), ModelCard(model=cfg, resize=None, scale=0.5, threshold=0.3))


BAD_FIELDS = {   # what an upstream system or an attacker could put in card.json
    "format from the future": ("format", 99),
    "another architecture": ("architecture", "resnet50"),
    "latent as a string": ("model", {"loss": "ssim", "latent": "100"}),
    "unknown loss": ("model", {"loss": "magic"}),
    "empty source size": ("source_size", [0, 0]),
    "negative scale": ("scale", -1),
    "scale as a string": ("scale", "0.5"),
    "scale that makes every image a bomb": ("scale", 1000.0),
    "threshold as a string": ("threshold", "high"),
    "threshold not finite": ("threshold", float("nan")),
    "weights outside the directory": ("weights", "../other/weights.pt"),
    "weights at an absolute path": ("weights", "/etc/passwd"),
    "weights with a backslash": ("weights", "..\\weights.pt"),
    "empty checksum": ("weights_sha256", ""),
    "score range upside down": ("score_range", [2.0, 0.0]),
    "normaliser outside the directory": ("normaliser", "../n.npz"),
}


@pytest.mark.parametrize("field, value", list(BAD_FIELDS.values()), ids=list(BAD_FIELDS))
def test_an_invalid_card_field_is_one_line_naming_the_card(saved, field, value):
    url, _ = saved
    path = Path(url) / "card.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    for load in (read_card, load_model):
        with pytest.raises(ValueError, match="invalid model card") as raised:
            load(url)
        assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)


def test_a_card_that_is_not_json_is_one_line(saved):
    url, _ = saved
    (Path(url) / "card.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"card.json: invalid model card"):
        read_card(url)


def test_missing_corrupted_or_swapped_weights_are_one_line_naming_the_file(saved, tmp_path):
    from ray_inspect.io.storage import StorageError

    url, card = saved
    weights = tmp_path / "m" / card.weights
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))                  # one bit flipped
    with pytest.raises(ValueError, match="checksum does not match") as raised:
        load_model(url)
    assert str(raised.value).startswith(str(weights))
    weights.unlink()
    with pytest.raises((StorageError, FileNotFoundError), match=card.weights):
        load_model(url)
    other = save_model(str(tmp_path / "other"), build_model(ModelConfig(latent=16)),
                       ModelCard(model=ModelConfig(latent=16)))
    swapped = (tmp_path / "other" / other.weights).read_bytes()   # another model's weights, its checksum
    weights.write_bytes(swapped)
    write_card(url, ModelCard(**{**card.__dict__, "weights_sha256": other.weights_sha256}))
    with pytest.raises(ValueError, match="weights do not fit the card's model") as raised:
        load_model(url)
    assert "\n" not in str(raised.value)


def test_the_card_given_is_the_card_used_even_after_a_retrain_into_the_same_directory(saved):
    """A scan's actors load the weights of the card the driver checked, not whatever card.json says
    by the time they start."""
    url, card = saved
    torch.manual_seed(1)
    save_model(url, build_model(ModelConfig(latent=8)), card)      # retrained: new weights, new card
    assert read_card(url).weights_sha256 != card.weights_sha256
    first = load_model(url, card=card)
    assert first.card == card
    state = torch.load(f"{url}/{card.weights}", weights_only=True)
    for k, v in first.state_dict().items():
        assert torch.equal(v, state[k])


def test_scan_and_calibrate_refuse_a_bad_model_in_one_line_before_any_actor_starts(saved, tmp_path,
                                                                                   monkeypatch):
    from click.testing import CliRunner
    from PIL import Image

    from ray_inspect.cli import main
    from ray_inspect.distributed import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started or joined for a model that cannot load")

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)      # where the scan starts or joins Ray
    url, card = saved
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "src" / "a.png")
    weights = tmp_path / "m" / card.weights
    weights.write_bytes(weights.read_bytes()[:-8])                           # a truncated upload
    for args in (["scan", url, str(tmp_path / "src"), str(tmp_path / "out")],
                 ["calibrate", url, str(tmp_path / "src"), "--fpr", "0.01"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        assert res.stderr.strip() == f"ray-inspect: error: {weights}: checksum does not match the card"
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "records").exists()
