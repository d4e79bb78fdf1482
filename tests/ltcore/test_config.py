from __future__ import annotations

import dataclasses

import pytest

from ltcore.config import (
    Config,
    ConfigError,
    DataConfig,
    apply_overrides,
    check_config,
    dump_yaml,
    from_dict,
    load_config,
    replace,
    to_dict,
)


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.lr=0", "stage1.lr must be > 0, got 0.0"),
        ("stage1.batch_size=0", "stage1.batch_size must be >= 1, got 0"),
        ("stage2.batch_size=-4", "stage2.batch_size must be >= 1, got -4"),
        ("stage2.epochs=0", "stage2.epochs must be >= 1, got 0"),
        ("stage2.lr=-1e-3", "stage2.lr must be > 0, got -0.001"),
        ("stage1.q=1.5", "stage1.q must be in [0, 1], got 1.5"),
        ("stage2.q=-0.5", "stage2.q must be in [0, 1], got -0.5"),
        ("stage1.momentum=1", "stage1.momentum must be in [0, 1), got 1.0"),
        ("stage2.tau_grid=[]", "stage2.tau_grid must be a non-empty list of tau values, got []"),
        ("train.torch_threads=-1", "train.torch_threads must be >= 0 (0 = one per worker CPU), got -1"),
        ("train.cpus_per_worker=0", "train.cpus_per_worker must be > 0, got 0.0"),
        ("data.split.val=1.5", "data.split.val must be in [0, 1], got 1.5"),
        ("data.name=a/b", "data.name must be a non-empty folder name without '/', got 'a/b'"),
        ("data.imbalance_factor=0.5", "data.imbalance_factor must be 0 (off) or >= 1, got 0.5"),
        ("data.source.embedded_imbalance=0.5", "data.source.embedded_imbalance must be >= 1, got 0.5"),
        ("eval.ece_bins=0", "eval.ece_bins must be >= 1, got 0"),
    ],
)
def test_values_out_of_range_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_range_checks_run_however_the_config_is_built(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match=r"^stage1.lr must be > 0, got -0.1$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^train.num_workers must be >= 1, got 0$"):
        from_dict({"train": {"num_workers": 0}})
    with pytest.raises(ConfigError, match=r"^stage1.epochs must be >= 1, got 0$"):
        replace(Config(), **{"stage1.epochs": 0})
    # a section built in code is checked on demand, named as in the config
    bad = DataConfig(image_size=0)
    with pytest.raises(ConfigError, match=r"^data.image_size must be >= 1, got 0$"):
        check_config(bad, "data.")
    with pytest.raises(ConfigError, match=r"^data.split.test must be in \[0, 1\], got -0.2$"):
        check_config(Config(data=DataConfig(split=dataclasses.replace(DataConfig().split, test=-0.2))))
    check_config(Config())  # the defaults are valid
