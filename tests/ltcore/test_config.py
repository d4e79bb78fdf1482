from __future__ import annotations

import dataclasses

import pytest

from ltcore.config import Config, ConfigError, apply_overrides, dump_yaml, from_dict, load_config, replace, to_dict


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["stage1.epochs=3", "stage1.lr=1e-3", "stage2.tau_grid=[0.5, 1.0]",
                             "data.source.kind=table", "stage1.loss.spmix=true", "train.run_id=007",
                             "train.use_gpu=no"])
    assert cfg.train.use_gpu == "no"  # a choice, not YAML's boolean false
    assert cfg.stage1.epochs == 3
    assert cfg.stage1.lr == pytest.approx(1e-3)
    assert cfg.stage2.tau_grid == (0.5, 1.0)
    assert cfg.data.source.kind == "table"
    assert cfg.stage1.loss.spmix is True
    assert cfg.train.run_id == "007"  # strings stay verbatim, not the int 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage1.epochs = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("stage1.epoch=3", "unknown config key 'stage1.epoch'"),
        ("stage1.epochs=three", "stage1.epochs: expected an integer"),
        ("stage1.optimizer=adam", "choose one of sgd, adamw"),
        ("stage1.loss.spmix=maybe", "expected true or false"),
        ("nosuch.key=1", "valid keys: dataset, data, model"),
        ("stage1=3", "is a section"),
        ("epochs", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.epochz'; valid keys here: method, epochs"):
        load_config(str(path))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_replace_with_dotted_keys_and_to_dict():
    cfg = replace(Config(), **{"stage1.epochs": 2, "train.num_workers": 1})
    assert (cfg.stage1.epochs, cfg.train.num_workers) == (2, 1)
    d = to_dict(cfg)
    assert d["stage1"]["epochs"] == 2 and isinstance(d["stage2"]["tau_grid"], list)
    assert from_dict(d) == cfg
    assert apply_overrides({}, ["model.backbone=resnet18"]) == {"model": {"backbone": "resnet18"}}


def test_base_file_is_overlaid(tmp_path):
    (tmp_path / "base.yaml").write_text("stage1:\n  epochs: 7\n  lr: 0.5\nmodel:\n  backbone: resnet18\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nstage1:\n  lr: 0.1\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.stage1.epochs, cfg.stage1.lr, cfg.model.backbone) == (7, 0.1, "resnet18")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(tmp_path / "loop.yaml"))
