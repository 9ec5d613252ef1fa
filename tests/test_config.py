"""Configuration dataclasses: YAML round trip, overrides, validation."""

from __future__ import annotations

import pytest

from cdkd.config import DistillConfig, apply_overrides, from_dict, load_config, save_config, to_dict
from cdkd.distill.trainer import total_steps
from cdkd.errors import ConfigError


def test_yaml_round_trip(tmp_path) -> None:
    cfg = apply_overrides(
        DistillConfig(),
        {
            "data.bands": (3, 2, 1),
            "train.lr": 3e-4,
            "teacher.checkpoint": "sam.pth",
            "objective.fixed_weights": [0.5, 0.25, 0.25],
        },
    )
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(DistillConfig, tmp_path / "c.yaml")
    assert back == cfg
    assert back.data.bands == (3, 2, 1) and isinstance(back.objective.fixed_weights, tuple)


def test_partial_file_keeps_defaults_and_coerces(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1.0e-4\n  steps: '50'\ndata:\n  bands: 4,3,2\n")
    cfg = load_config(DistillConfig, tmp_path / "c.yaml")
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 50 and cfg.data.bands == (4, 3, 2)
    assert cfg.teacher == DistillConfig().teacher


@pytest.mark.parametrize(
    "data,match",
    [
        ({"train": {"nope": 1}}, "nope"),
        ({"train": {"steps": 1.5}}, "integer"),
        ({"train": {"lr": "fast"}}, "float"),
        ({"data": {"augment": "maybe"}}, "true/false"),
        ({"objective": {"fixed_weights": [1, 2]}}, "3 values"),
        ({"train": 5}, "mapping"),
    ],
)
def test_bad_values_name_the_key(data, match) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(DistillConfig, data, source="x.yaml")


def test_overrides_reject_unknown_keys_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(DistillConfig(), {"train.learning_rate": 1})
    with pytest.raises(ConfigError, match="not found"):
        load_config(DistillConfig, tmp_path / "missing.yaml")
    assert to_dict(DistillConfig())["train"]["lr"] == 1e-5


def test_total_steps_from_epochs() -> None:
    cfg = apply_overrides(DistillConfig(), {"train.epochs": 1.0, "train.batch_size": 2, "train.grad_accum": 2})
    assert total_steps(cfg, 350, world_size=1) == 88  # ceil(350 / 4)
    assert total_steps(cfg, 350, world_size=2) == 44
    assert total_steps(apply_overrides(cfg, {"train.epochs": None, "train.steps": 7}), 350, 1) == 7


def test_partial_section_keeps_the_parent_defaults(tmp_path) -> None:
    from cdkd.config import FinetuneConfig

    (tmp_path / "c.yaml").write_text("train: {log_every: 1}\n")
    cfg = load_config(FinetuneConfig, tmp_path / "c.yaml")
    assert cfg.train == FinetuneConfig().train.__class__(**{**to_dict(FinetuneConfig())["train"], "log_every": 1})
    assert cfg.train.lr == 1e-4 and cfg.train.lr_schedule == "poly"  # fine-tuning's, not TrainConfig's class defaults
