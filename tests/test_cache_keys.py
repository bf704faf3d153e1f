"""Eval cache keys: which changes of a method's defaults, settings and subject retrain a concept and
which keep the concepts trained before them."""

from __future__ import annotations

import numpy as np

from limner.methods import get_method
from limner.training import TrainConfig


def test_changing_a_default_changes_the_eval_cache_key(monkeypatch):
    import limner.methods.dreambooth as db
    from limner.evaluation.cache_keys import default_settings

    before = default_settings(get_method("dreambooth"))
    monkeypatch.setattr(db, "default_train_config", lambda lora: TrainConfig(max_steps=7))
    assert default_settings(get_method("dreambooth")) != before
    assert default_settings(get_method("textual_inversion"))["train"]["learning_rate"] > 0


def test_a_new_setting_that_is_off_by_default_keeps_the_concepts_trained_before_it(monkeypatch):
    from limner.evaluation import cache_keys
    from limner.evaluation.cache_keys import concept_key

    ti = get_method("textual_inversion")
    before, plain = concept_key(ti, {}, "subject", "base"), cache_keys.default_settings
    monkeypatch.setattr(cache_keys, "default_settings", lambda method: plain(method) | {"new_setting": None})
    assert concept_key(ti, {}, "subject", "base") == before
    assert concept_key(ti, {"new_setting": 2}, "subject", "base") != before
    assert (
        concept_key(ti, {"num_vectors": 8}, "subject", "base")
        != before
        != concept_key(ti, {}, "other subject", "base")
    )


def test_a_subjects_masks_enter_its_fingerprint_only_where_training_reads_them():
    from limner.evaluation.subjects import EvalSubject

    images = [np.zeros((8, 8, 3), np.uint8)]
    a = EvalSubject("s", "ball", images, masks=[np.zeros((8, 8), bool)])
    b = EvalSubject("s", "ball", images, masks=[np.ones((8, 8), bool)])
    assert a.fingerprint() == b.fingerprint(), "a concept trained without masks keeps its cache key"
    assert a.fingerprint(masks=True) != b.fingerprint(masks=True), "a masked loss retrains when the masks change"


def test_only_the_masked_loss_reads_a_subjects_masks():
    assert get_method("textual_inversion").reads_masks({"background_weight": 0.1})
    assert not get_method("textual_inversion").reads_masks({"num_vectors": 2})
    assert not get_method("dreambooth").reads_masks({})


def test_a_new_setting_declared_as_added_keeps_the_concepts_trained_before_it(monkeypatch):
    from dataclasses import dataclass, fields

    from limner.evaluation.cache_keys import concept_key, default_settings
    from limner.methods import added_setting

    ti = get_method("textual_inversion")
    plain_config = ti.default_config
    before = concept_key(ti, {}, "subject", "base")

    def with_config(cls):
        def default_config(self):
            cfg = plain_config()
            return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

        monkeypatch.setattr(type(ti), "default_config", default_config)

    @dataclass
    class WithAdded(type(plain_config())):
        gentle: bool = added_setting(False)

    @dataclass
    class WithPlain(type(plain_config())):
        gentle: bool = False  # declared plainly, its default enters every key

    with_config(WithAdded)
    assert default_settings(ti)["gentle"] is False
    assert concept_key(ti, {}, "subject", "base") == concept_key(ti, {"gentle": False}, "subject", "base") == before
    assert concept_key(ti, {"gentle": True}, "subject", "base") != before
    with_config(WithPlain)
    assert concept_key(ti, {}, "subject", "base") != before


def test_settings_given_that_equal_a_default_are_the_same_run():
    from limner.evaluation.cache_keys import default_settings, settings_with

    lora, ti = get_method("dreambooth_lora"), get_method("textual_inversion")
    assert settings_with(lora, {"lora_rank": 16, "learning_rate": 2e-3}) == default_settings(lora)
    assert settings_with(lora, {"max_steps": 800})["train"]["max_steps"] == 800
    assert settings_with(lora, {"lora_rank": 8}) != default_settings(lora)
    assert settings_with(lora, {"min_snr_gamma": 5})["train"]["min_snr_gamma"] == 5.0
    assert isinstance(settings_with(lora, {"min_snr_gamma": 5})["train"]["min_snr_gamma"], float)
    assert settings_with(ti, {"learning_rate": 5e-3, "num_vectors": 4}) == default_settings(ti)


def test_two_adapters_encoding_the_same_embeddings_do_not_share_generated_images(tmp_path):
    """An encoder concept holds the image encoder's embeddings, which two adapters over one encoder share: the
    adapter that draws them must be in the key of the images drawn, or a second adapter reads the first's."""
    import json

    from limner.evaluation.cache import concept_fingerprint

    def concept(name: str, **manifest) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "embeds.bin").write_bytes(b"the same embeddings")
        fields = {"method": "ip_adapter", "subject": "duo_ball", "base_fingerprint": "b", "steps": 0} | manifest
        (folder / "limner.json").write_text(json.dumps(fields))
        return concept_fingerprint(folder)

    a, b = concept("a", adapter_fingerprint="aaaa"), concept("b", adapter_fingerprint="bbbb")
    assert a != b
    assert concept("c", adapter_fingerprint="aaaa") == a
    # a tuning concept has no adapter: its key is what it was before adapters existed
    assert concept("d") == concept("e") != a
