"""The configuration schema: defaults (the demo), params files, overrides, ranges, recipes and stage settings."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import (
    DEFAULTS_HEADER,
    STAGE_PARAMS,
    STAGES,
    Config,
    ConfigError,
    UndeclaredSetting,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    replace_settings,
    stage_config,
    to_dict,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _get(tree, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _nested(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    *sections, leaf = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


# ------------------------------------------------------------------------------------------ defaults = demo


def test_defaults_are_the_demo():
    """The values the README's demo results were measured with (formerly only in params.yaml)."""
    cfg = Config()
    assert (cfg.demo.n_train, cfg.demo.n_val, cfg.demo.n_test) == (500, 500, 1000)
    assert (cfg.distill.epochs, cfg.distill.lr, cfg.distill.lr_step_epochs) == (20, 3e-4, [16])
    assert (cfg.distill.losses.margin, cfg.distill.losses.queue_size) == (0.2, 4096)
    assert (cfg.student.img_size, cfg.student.patch_size) == (64, 16)
    assert [t.name for t in cfg.extra_teachers] == ["beit3_small"]
    assert cfg.extra_teachers[0].checkpoint == "data/teacher/demo_beit3_small.pth"
    assert cfg.demo_teacher.second.name == "beit3_small"
    assert (cfg.distill.mcad.teachers, cfg.distill.mcad.teacher_weights) == (["beit3", "beit3_small"], [0.5, 0.5])
    assert (cfg.distill.val_ks, cfg.distill.val_batch_size) == (cfg.evaluate.ks, cfg.evaluate.batch_size)


def test_params_yaml_is_exactly_the_schema_printout():
    text = (REPO / "params.yaml").read_text()
    assert text == dump_config(Config(), DEFAULTS_HEADER), "regenerate: dsmd config --defaults --out params.yaml"
    assert load_config(REPO / "params.yaml") == Config()
    from pipeline.cli import app

    printed = CliRunner().invoke(app, ["--params", "/nonexistent.yaml", "config", "--defaults"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == text


def test_no_file_means_the_defaults_only_when_asked():
    assert load_config(None) == Config()
    validate_config(Config())


# ------------------------------------------------------------------------------------------ params files


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
    assert cfg.distill.epochs == Config().distill.epochs  # a partial file: the rest at the defaults


def test_yaml_floats_in_the_file_are_numbers(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  lr: 3e-4\n  weight_decay: 1E-5\n  epochs: 7\n  losses:\n    tau: +5e-2\n"
                    "demo_teacher:\n  lr: 1.5e-3\n")
    cfg = load_config(path)
    assert cfg.distill.lr == 3e-4 and cfg.distill.weight_decay == 1e-5 and cfg.distill.losses.tau == 0.05
    assert cfg.demo_teacher.lr == 1.5e-3
    assert cfg.distill.epochs == 7 and isinstance(cfg.distill.epochs, int)
    # Quoted, it is a string, and a string is not a number.
    path.write_text("distill:\n  lr: '3e-4'\n")
    with pytest.raises(ConfigError, match=r"distill\.lr: expected a number, got '3e-4'"):
        load_config(path)


def test_yaml_reading_keeps_other_scalars():
    assert read_yaml("a: 1e5\nb: 100\nc: 1.0\nd: x1e5\ne: 1e\nf: .5e-1\ng: '1e5'") == {
        "a": 1e5, "b": 100, "c": 1.0, "d": "x1e5", "e": "1e", "f": 0.05, "g": "1e5",
    }


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "the settings file is empty; write the demo's with `dsmd config --defaults --out"),
        ("# only a comment\n", "the settings file is empty"),
        ("- distill\n- lr\n", "expected a mapping of sections .* got list"),
        ("3\n", "expected a mapping of sections .* got int"),
        ("distill: [unclosed\n", "not valid YAML: line 2, column 1"),
        ("distill:\n  lr: 0.1\ndistill:\n  epochs: 2\n",
         "not valid YAML: line 3, column 1: the key 'distill' appears twice"),
        ("distill: 3\n", "distill: expected a mapping of settings, got 3"),
        ("distill:\n  lrr: 3\n", r"unknown setting distill\.lrr"),
    ],
)
def test_bad_params_files_are_named_with_the_fix(tmp_path, text, pattern):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {pattern}"):
        load_config(path)


def test_missing_or_unreadable_params_file_is_an_error(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: no such settings file; write the demo's with "
                                                    f"`dsmd config --defaults --out {missing}`")):
        load_config(missing)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read the settings file")):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00distill")
    with pytest.raises(ConfigError, match="binary.yaml: cannot read the settings file"):
        load_config(binary)


def test_an_explicitly_empty_mapping_is_the_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    assert load_config(path) == Config()


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["distill.epochs=3", "student.text_model_dir=/x/y", "distill.lr=1e-5"])
    path = tmp_path / "params.yaml"
    path.write_text(dump_config(cfg, "a header\nof two lines"))
    assert path.read_text().startswith("# a header\n# of two lines\ndata:\n")
    assert load_config(path) == cfg


# ------------------------------------------------------------------------------------------ keys, types, ranges


def test_int_accepted_for_float_but_not_the_reverse():
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


# (key, value as written in YAML, the message)
OUT_OF_RANGE = [
    ("distill.batch_size", "-32", "distill.batch_size: -32 is out of range; it must be >= 1"),
    ("distill.batch_size", "0", "distill.batch_size: 0 is out of range; it must be >= 1"),
    ("distill.epochs", "0", "distill.epochs: 0 is out of range; it must be >= 1"),
    ("distill.grad_accum", "0", "distill.grad_accum: 0 is out of range; it must be >= 1"),
    ("distill.lr", "-1", "distill.lr: -1.0 is out of range; it must be > 0"),
    ("distill.lr", "0", "distill.lr: 0.0 is out of range; it must be > 0"),
    ("distill.lr", ".nan", "distill.lr: nan is not a finite number"),
    ("distill.lr", "1e999", "distill.lr: inf is not a finite number"),
    ("distill.weight_decay", "-1e-4", "distill.weight_decay: -0.0001 is out of range; it must be >= 0"),
    ("distill.lr_gamma", "1.5", "distill.lr_gamma: 1.5 is out of range; it must be > 0 and <= 1"),
    ("distill.lr_step_epochs", "[4, 0]", "distill.lr_step_epochs[1]: 0 is out of range; it must be >= 1"),
    ("distill.seed", "-1", "distill.seed: -1 is out of range; it must be >= 0"),
    ("distill.loader_workers", "-1", "distill.loader_workers: -1 is out of range; it must be >= 0"),
    ("distill.val_ks", "[]", "distill.val_ks: needs at least 1 entry, got []"),
    ("distill.val_ks", "[1, 5, 1]", "distill.val_ks: 1 is listed twice in [1, 5, 1]"),
    ("distill.val_batch_size", "0", "distill.val_batch_size: 0 is out of range; it must be >= 1"),
    ("distill.losses.tau", "0", "distill.losses.tau: 0.0 is out of range; it must be > 0"),
    ("distill.losses.margin", "-0.1", "distill.losses.margin: -0.1 is out of range; it must be >= 0"),
    ("distill.losses.queue_size", "0", "distill.losses.queue_size: 0 is out of range; it must be >= 1"),
    ("distill.balancer.temperature", "0", "distill.balancer.temperature: 0.0 is out of range; it must be > 0"),
    ("distill.balancer.period", "0", "distill.balancer.period: '0' is not allowed; it must be 'epoch' or a "
                                     "positive number of steps"),
    ("distill.balancer.period", "weekly", "distill.balancer.period: 'weekly' is not allowed"),
    ("distill.mcad.temperature", "-1", "distill.mcad.temperature: -1.0 is out of range; it must be > 0"),
    ("distill.mcad.beta", ".inf", "distill.mcad.beta: inf is not a finite number"),
    ("distill.mcad.teacher_weights", "[1, -1]", "distill.mcad.teacher_weights[1]: -1.0 is out of range"),
    ("distill.mcad.teachers", "[]", "distill.mcad.teachers: needs at least 1 entry"),
    ("distill.mcad.align_ridge", "-1", "distill.mcad.align_ridge: -1.0 is out of range; it must be >= 0"),
    ("distill.supervised.dim", "0", "distill.supervised.dim: 0 is out of range; it must be >= 1"),
    ("distill.method", "clip", "distill.method: 'clip' is not one of 'dsmd', 'mcad', 'supervised'"),
    ("extract.image_batch_size", "0", "extract.image_batch_size: 0 is out of range; it must be >= 1"),
    ("extract.text_batch_size", "-5", "extract.text_batch_size: -5 is out of range; it must be >= 1"),
    ("extract.rows_per_chunk", "0", "extract.rows_per_chunk: 0 is out of range; it must be >= 1"),
    ("extract.splits", "[train, train]", "extract.splits: 'train' is listed twice"),
    ("evaluate.ks", "[0, 5]", "evaluate.ks[0]: 0 is out of range; it must be >= 1"),
    ("evaluate.memory_budget_mb", "0", "evaluate.memory_budget_mb: 0 is out of range; it must be >= 1"),
    ("demo.image_size", "8", "demo.image_size: 8 is out of range; it must be >= 16"),
    ("demo.n_train", "0", "demo.n_train: 0 is out of range; it must be >= 1"),
    ("demo_teacher.vocab_size", "4", "demo_teacher.vocab_size: 4 is out of range; it must be >= 8"),
    ("demo_teacher.lr", "0", "demo_teacher.lr: 0.0 is out of range; it must be > 0"),
    ("student.patch_size", "0", "student.patch_size: 0 is out of range; it must be >= 1"),
    ("teacher.img_size", "-384", "teacher.img_size: -384 is out of range; it must be >= 1"),
]


@pytest.mark.parametrize(("key", "raw", "message"), OUT_OF_RANGE, ids=[f"{k}={r}" for k, r, _ in OUT_OF_RANGE])
def test_ranges_are_checked_alike_from_the_file_and_from_set(tmp_path, key, raw, message):
    with pytest.raises(ConfigError) as from_set:
        load_config(None, [f"{key}={raw}"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_nested(key, read_yaml(raw))))
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    assert str(from_set.value).startswith(message), str(from_set.value)
    assert str(from_file.value) == f"{path}: {from_set.value}"


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("distill.batch_size=1", 1), ("distill.lr_gamma=1", 1.0), ("distill.losses.margin=0", 0.0),
        ("distill.balancer.period=500", "500"), ("distill.balancer.period=Epoch", "Epoch"), ("demo.n_val=0", 0),
        ("extract.loader_workers=0", 0), ("distill.mcad.beta=-0.5", -0.5), ("demo.image_size=16", 16),
    ],
)
def test_range_edges_are_accepted(override, value):
    key, _ = parse_override(override)
    assert _get(to_dict(load_config(None, [override])), key) == value


def test_lr_steps_past_the_last_epoch_are_allowed():
    """A finished run can be extended (epochs is a run-time setting): its later steps must stay legal."""
    assert load_config(None, ["distill.epochs=2", "distill.lr_step_epochs=[100]"]).distill.lr_step_epochs == [100]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["extract.rows_per_shard=100", "extract.rows_per_chunk=30"],
         r"extract\.rows_per_shard \(100\) must be a multiple of extract\.rows_per_chunk \(30\)"),
        (["distill.batch_size=64", "distill.grad_accum=3"],
         r"distill\.batch_size \(64\) must be a multiple of distill\.grad_accum \(3\)"),
        (["student.img_size=64", "student.patch_size=12"],
         r"student\.img_size \(64\) must be a multiple of student\.patch_size \(12\)"),
        (["student.text_hidden=32", "student.text_heads=3"],
         r"student\.text_hidden \(32\) must be a multiple of student\.text_heads \(3\)"),
        (["demo_teacher.second.embed_dim=50", "demo_teacher.second.heads=4"],
         r"demo_teacher\.second\.embed_dim \(50\) must be a multiple of demo_teacher\.second\.heads \(4\)"),
        (["distill.mcad.teachers=[beit3]"],
         r"distill\.mcad\.teacher_weights has 2 entries for the 1 teachers .*: give one weight per teacher"),
        (["distill.mcad.teacher_weights=[0, 0]"], r"distill\.mcad\.teacher_weights are all 0"),
        (["distill.method=mcad", "distill.teacher=beit3_small"],
         r"distill\.teacher \('beit3_small'\) must be the first of distill\.mcad\.teachers"),
        (["extra_teachers=[{name: beit3}]"], r"teacher name 'beit3' is used twice"),
    ],
)
def test_bad_combinations_fail_with_one_message(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_combination_checks_spare_what_does_not_apply():
    # A Hugging Face text encoder brings its own sizes; DSMD runs whatever distill.teacher is.
    load_config(None, ["student.text_hidden=32", "student.text_heads=3", "student.text_model_dir=/m"])
    load_config(None, ["distill.teacher=beit3_small"])


def test_validate_config_checks_a_config_built_in_code():
    cfg = Config()
    cfg.distill = dataclasses.replace(cfg.distill, batch_size=0)
    with pytest.raises(ConfigError, match=r"distill\.batch_size: 0 is out of range"):
        validate_config(cfg)


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=3e-4") == ("a.b", 3e-4)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 5]") == ("a.b", [1, 5])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=1.5.2") == ("a.b", "1.5.2")


# ------------------------------------------------------------------------------------------ recipes


def _leaves(node: yaml.MappingNode, path: tuple = ()):
    """(dotted key, line number) of every setting a YAML file gives (mappings are sections, the rest values)."""
    for key_node, value_node in node.value:
        key = (*path, key_node.value)
        if isinstance(value_node, yaml.MappingNode) and value_node.value:
            yield from _leaves(value_node, key)
        else:
            yield ".".join(key), key_node.start_mark.line


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_override_only_what_differs_each_with_a_comment(recipe):
    assert len(RECIPES) >= 2
    text = recipe.read_text()
    lines = text.splitlines()
    cfg = load_config(recipe)
    given, defaults = to_dict(cfg), to_dict(Config())
    leaves = list(_leaves(yaml.compose(text)))
    assert len(leaves) >= 10
    for key, line in leaves:
        assert _get(given, key) != _get(defaults, key), f"{recipe.name}: {key} repeats the default"
        commented = "#" in lines[line] or (line > 0 and lines[line - 1].lstrip().startswith("#"))
        assert commented, f"{recipe.name}: {key} (line {line + 1}) has no comment saying why"
    # What makes them the paper's setting: a pretrained ViT-B/16 + BERT student, the paper's schedule.
    assert (cfg.student.img_size, cfg.distill.epochs, cfg.distill.lr) == (224, 20, 1e-4)
    assert cfg.distill.lr_step_epochs == [10]
    assert cfg.distill.losses.margin == 0.0 and cfg.distill.losses.queue_size == 8192


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_becomes_a_full_params_file(recipe, tmp_path):
    from pipeline.cli import app

    out = tmp_path / "params.yaml"
    result = CliRunner().invoke(app, ["--params", str(recipe), "config", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert set(_flat(written)) == set(_flat(to_dict(Config())))  # every key, as dvc.yaml needs
    assert load_config(out) == load_config(recipe)
    assert out.read_text().startswith(f"# Every dsmd setting: {recipe} over the built-in defaults")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# ------------------------------------------------------------------------------------------ stages


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_params_are_the_declared_stage_settings():
    stages = _dvc_stages()
    assert set(stages) == set(STAGE_PARAMS)
    for name, stage in stages.items():
        assert stage.get("params", []) == STAGE_PARAMS[name], name


def test_settings_in_dvc_paths_are_declared_reads():
    """A setting that dvc.yaml interpolates into a stage (deps, outs, cmd) is one the stage reads."""
    for name, stage in _dvc_stages().items():
        for ref in re.findall(r"\$\{([^}]+)\}", json.dumps(stage)):
            assert any(ref == key or ref.startswith(key + ".") for key in STAGES[name].keys), (name, ref)


def test_every_declared_setting_exists():
    cfg = Config()
    for name in STAGES:
        view = stage_config(cfg, name)  # raises on a declared key the schema lacks
        for key in STAGES[name].keys:
            through_view, direct = view, cfg
            for part in key.split("."):
                through_view, direct = getattr(through_view, part), getattr(direct, part)
            assert through_view == direct, (name, key)


def test_stage_config_gives_only_the_declared_settings():
    cfg = Config()
    view = stage_config(cfg, "distill")
    assert view.distill is cfg.distill and dataclasses.asdict(view.student) == dataclasses.asdict(cfg.student)
    assert view.distill.val_ks == [1, 5, 10]
    assert view.data.canonical_dir == cfg.data.canonical_dir and view.extract.store == cfg.extract.store
    with pytest.raises(UndeclaredSetting, match=r"stage distill read evaluate, which it does not declare"):
        view.evaluate  # noqa: B018
    with pytest.raises(UndeclaredSetting, match=r"stage distill read data\.source"):
        view.data.source  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        view.distill = None
    with pytest.raises(ConfigError, match="no settings are declared for stage 'nosuch'"):
        stage_config(cfg, "nosuch")
    extract = stage_config(cfg, "extract")
    assert extract.distill.mcad.teachers == cfg.distill.mcad.teachers
    with pytest.raises(UndeclaredSetting, match=r"distill\.mcad\.beta"):
        extract.distill.mcad.beta  # noqa: B018


def test_a_stage_view_copies_with_changes_and_stays_a_view():
    cfg = Config()
    view = stage_config(cfg, "extract")
    other = dataclasses.replace(cfg.teacher, name="second")
    swapped = replace_settings(view, teacher=other)
    assert swapped.teacher.name == "second" and view.teacher.name == cfg.teacher.name
    assert swapped.extract is cfg.extract
    with pytest.raises(UndeclaredSetting, match=r"stage extract read evaluate"):
        swapped.evaluate  # noqa: B018
    with pytest.raises(UndeclaredSetting, match=r"stage extract read student"):
        replace_settings(view, student=cfg.student)
    assert replace_settings(cfg, teacher=other).teacher.name == "second"  # a plain Config as dataclasses.replace


def _literal_choices(cls, prefix=""):
    import typing

    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls, include_extras=True)[f.name]
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is typing.Literal:
            yield f"{prefix}{f.name}", typing.get_args(hint)
        elif dataclasses.is_dataclass(hint):
            yield from _literal_choices(hint, f"{prefix}{f.name}.")


def test_every_choice_survives_an_unquoted_yaml_round_trip():
    """`dvc exp run -S key=value` writes params.yaml back with values unquoted; a choice that YAML 1.1 reads as
    something else (off, on, yes, no: booleans) would then fail the next run. Found with distill.views=off."""
    from pipeline.config.schema import Config

    checked = 0
    for key, choices in _literal_choices(Config):
        for choice in choices:
            if choice == "":
                continue  # every YAML writer quotes the empty string
            assert yaml.safe_load(f"value: {choice}")["value"] == choice, f"{key}: {choice!r}"
            checked += 1
    assert checked >= 20  # the schema has many choices; an empty walk would pass vacuously
