"""The model card: one scale factor for every image, the score options, the normaliser file."""

import json

import numpy as np
import pytest
import torch

from ray_inspect.config import ModelConfig, ScoreConfig
from ray_inspect.core.model import build_model
from ray_inspect.core.scoring import PositionStats
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


def test_normaliser_file_round_trips_and_is_checked(tmp_path):
    url = str(tmp_path / "m")
    cfg = ModelConfig()
    torch.manual_seed(0)
    card = save_model(url, build_model(cfg), ModelCard(model=cfg, resize=None, scale=0.5))
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
