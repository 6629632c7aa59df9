"""The configuration schema: defaults, params.yaml, overrides, and errors that name the key."""

import pytest
import yaml

from pipeline.config import Config, ConfigError, dump_config, load_config, parse_override


def test_defaults_without_file(tmp_path):
    cfg = load_config(tmp_path / "missing.yaml")
    assert isinstance(cfg, Config)
    assert cfg.distill.losses.tau == 0.05
    assert cfg.distill.losses.queue_size == 8192
    assert cfg.distill.balancer.temperature == 1.0
    assert cfg.demo.n_test == 1000


def test_file_and_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"distill": {"lr": 0.001, "losses": {"cd": False}}, "evaluate": {"ks": [1, 2]}}))
    cfg = load_config(path, ["distill.lr=3e-4", "distill.balancer.enabled=false", "extract.splits=[test]"])
    assert cfg.distill.lr == pytest.approx(3e-4)
    assert cfg.distill.losses.cd is False
    assert cfg.distill.losses.fd is True
    assert cfg.distill.balancer.enabled is False
    assert cfg.evaluate.ks == [1, 2]
    assert cfg.extract.splits == ["test"]


def test_int_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["distill.lr=1"]).distill.lr == 1.0
    with pytest.raises(ConfigError, match=r"distill\.epochs: expected an integer"):
        load_config(None, ["distill.epochs=2.5"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("distill.lrr=1", r"unknown setting distill\.lrr"),
        ("nosuch.key=1", r"unknown setting nosuch"),
        ("distill.lr=abc", r"distill\.lr: expected a number"),
        ("distill.losses.cd=maybe", r"distill\.losses\.cd: expected true or false"),
        ("extract.backend=parquet", r"extract\.backend: 'parquet' is not one of"),
        ("evaluate.ks=[1, x]", r"evaluate\.ks\[1\]: expected an integer"),
        ("distill.lr.x=1", r"distill\.lr: expected a number"),
        ("distill=3", r"distill: expected a mapping"),
        ("justtext", r"must look like section\.key=value"),
    ],
)
def test_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(path)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["distill.epochs=3", "student.text_model_dir=/x/y"])
    path = tmp_path / "params.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=3e-4") == ("a.b", 3e-4)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 5]") == ("a.b", [1, 5])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


@pytest.mark.parametrize("name", ["params.yaml", "recipes/flickr30k.yaml", "recipes/coco.yaml"])
def test_shipped_params_files_hold_every_setting(name):
    """dvc.yaml names settings as params: a file missing one would make `dvc repro` fail, so each shipped file
    must load cleanly and spell out the whole schema."""
    from dataclasses import asdict
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / name
    load_config(path)
    assert _keys(yaml.safe_load(path.read_text())) == _keys(asdict(Config()))
