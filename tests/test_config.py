"""Configuration through real files: defaults, the original keys, paths, environment overrides, errors, secrets."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import re
from pathlib import Path

import pytest

from image_search.config import Config, ConfigError, load_config
from image_search.runtime import prepare_folders
from tests.support.privileges import give_to_unprivileged, reachable_dir, unprivileged

ORIGINAL_KEYS = {
    "source-directory": "photos",
    "processed-directory": "work/processed",
    "output-directory": "results",
    "device": "cpu",
    "model-name": "openai/clip-vit-base-patch32",
    "dimension": 512,
    "resize-width": 640,
    "resize-height": 480,
    "postgres-host": "db.example.com",
    "postgres-port": 15432,
    "postgres-user": "indexer",
    "postgres-password": "hunter2-Secret!",
    "postgres-database": "images",
}

SERVICE_KEYS = {
    "inbox-directory": "drop",
    "state-directory": "var/state",
    "top-k": 25,
    "batch-size": 4,
    "cleanup-on-exit": False,
    "max-image-pixels": 50_000_000,
    "settle-seconds": 2.5,
    "rescan-interval": 60,
    "ef-search": 200,
    "exact-search-below": 500,
}


def write(folder: Path, data: object, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def error_for(folder: Path, data: object, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(folder, data), environ={} if environ is None else environ)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Defaults and the original keys
# --------------------------------------------------------------------------------------------------


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.device == "auto"
    assert cfg.top_k == 10
    assert cfg.cleanup_on_exit is True
    assert cfg.postgres_host == "" and cfg.embedded_database is True
    assert cfg.postgres_port == 5432
    assert cfg.postgres_password == ""
    assert cfg.dimension > 0 and cfg.resize_width > 0 and cfg.resize_height > 0 and cfg.batch_size > 0
    assert cfg.model_name
    # default folders are absolute, under the working directory
    for attr, name in (("source_directory", "images"), ("processed_directory", "processed"),
                       ("output_directory", "output"), ("inbox_directory", "inbox"), ("state_directory", "state")):
        value = getattr(cfg, attr)
        assert isinstance(value, Path) and value.is_absolute()
        assert value == tmp_path / name


def test_empty_json_object_gives_defaults_with_folders_next_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "etc", {})
    cfg = load_config(path, environ={})
    assert cfg.top_k == 10 and cfg.device == "auto"
    assert cfg.source_directory == tmp_path / "etc" / "images"
    assert cfg.state_directory == tmp_path / "etc" / "state"


def test_every_original_key_is_accepted_with_its_original_name(tmp_path):
    folder = tmp_path / "conf"
    cfg = load_config(write(folder, ORIGINAL_KEYS), environ={})
    assert cfg.source_directory == folder / "photos"
    assert cfg.processed_directory == folder / "work" / "processed"
    assert cfg.output_directory == folder / "results"
    assert cfg.device == "cpu"
    assert cfg.model_name == "openai/clip-vit-base-patch32"
    assert (cfg.dimension, cfg.resize_width, cfg.resize_height) == (512, 640, 480)
    assert (cfg.postgres_host, cfg.postgres_port) == ("db.example.com", 15432)
    assert (cfg.postgres_user, cfg.postgres_password, cfg.postgres_database) == ("indexer", "hunter2-Secret!", "images")
    assert cfg.embedded_database is False


def test_every_service_key_is_accepted(tmp_path):
    folder = tmp_path / "conf"
    cfg = load_config(write(folder, {**ORIGINAL_KEYS, **SERVICE_KEYS}), environ={})
    assert cfg.inbox_directory == folder / "drop"
    assert cfg.state_directory == folder / "var" / "state"
    assert (cfg.top_k, cfg.batch_size, cfg.cleanup_on_exit) == (25, 4, False)
    assert cfg.max_image_pixels == 50_000_000
    assert cfg.settle_seconds == 2.5
    assert cfg.rescan_interval == 60.0 and isinstance(cfg.rescan_interval, float)
    assert (cfg.ef_search, cfg.exact_search_below) == (200, 500)


def test_to_json_dict_uses_the_json_key_names_and_round_trips(tmp_path):
    folder = tmp_path / "conf"
    cfg = load_config(write(folder, {**ORIGINAL_KEYS, **SERVICE_KEYS}), environ={})
    full = cfg.to_json_dict(redact=False)
    assert set(ORIGINAL_KEYS) | set(SERVICE_KEYS) <= set(full)
    json.dumps(full)  # serialisable: paths are strings
    again = load_config(write(tmp_path / "other", full), environ={})
    assert again == cfg


def test_shipped_example_config_loads():
    example = Path(__file__).resolve().parents[1] / "config.example.json"
    cfg = load_config(example, environ={})
    assert cfg.embedded_database
    assert cfg.source_directory.name == "images"
    assert cfg.inbox_directory.name == "inbox"
    assert cfg.output_directory.name == "output"
    assert cfg.processed_directory.name == "processed"


def test_env_flag_is_an_alias_of_config():
    """`image-search --env C` (the original tool's flag) names the same JSON file as --config."""
    from image_search.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--env", "c.json"]).config == Path("c.json")
    assert parser.parse_args(["--config", "c.json"]).config == Path("c.json")
    assert parser.parse_args(["--env", "c.json", "--process-only"]).process_only is True
    assert parser.parse_args(["index", "--env", "c.json"]).config == Path("c.json")


@pytest.mark.parametrize("command", ["index", "search", "serve", "duplicates"])
def test_the_common_flags_count_before_the_command_as_after_it(command: str) -> None:
    """`image-search --no-cleanup serve --config C` emptied the table at its stop: the command's own
    default overwrote the flag given before it. So did --log-level and --config."""
    from image_search.cli import build_parser

    parser = build_parser()
    before = parser.parse_args(["--no-cleanup", "--log-level", "warning", "--config", "c.json", command])
    after = parser.parse_args([command, "--no-cleanup", "--log-level", "warning", "--config", "c.json"])
    for args in (before, after):
        assert (args.no_cleanup, args.log_level, args.config) == (True, "warning", Path("c.json"))
    plain = parser.parse_args([command, "--config", "c.json"])
    assert (plain.no_cleanup, plain.log_level) == (False, "info")


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_files_folder_not_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "deploy" / "conf"
    cfg = load_config(write(folder, {"source-directory": "../pictures", "processed-directory": "cache/processed",
                                     "output-directory": "./out"}), environ={})
    assert cfg.source_directory.resolve() == (tmp_path / "deploy" / "pictures").resolve()
    assert cfg.processed_directory == folder / "cache" / "processed"
    assert cfg.output_directory.resolve() == (folder / "out").resolve()
    assert cfg.inbox_directory == folder / "inbox"  # a default folder also lives next to the file


def test_config_file_given_by_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "conf", {"source-directory": "pics"})
    cfg = load_config(Path("conf/config.json"), environ={})
    assert cfg.source_directory.is_absolute()
    assert cfg.source_directory == tmp_path / "conf" / "pics"


def test_absolute_paths_are_kept(tmp_path):
    target = tmp_path / "abs" / "images"
    cfg = load_config(write(tmp_path / "conf", {"source-directory": str(target)}), environ={})
    assert cfg.source_directory == target


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(write(tmp_path / "conf", {"source-directory": "~/Pictures"}), environ={})
    assert cfg.source_directory == tmp_path / "home" / "Pictures"


# --------------------------------------------------------------------------------------------------
# Environment overrides
# --------------------------------------------------------------------------------------------------


def test_environment_overrides_any_key(tmp_path):
    path = write(tmp_path / "conf", ORIGINAL_KEYS)
    environ = {
        "IMAGE_SEARCH_POSTGRES_PASSWORD": "from-env-secret",
        "IMAGE_SEARCH_POSTGRES_HOST": "pg.internal",
        "IMAGE_SEARCH_POSTGRES_PORT": "6543",
        "IMAGE_SEARCH_DEVICE": "cuda",
        "IMAGE_SEARCH_MODEL_NAME": "google/siglip-base-patch16-224",
        "IMAGE_SEARCH_TOP_K": "3",
        "IMAGE_SEARCH_SETTLE_SECONDS": "0.25",
        "IMAGE_SEARCH_EXACT_SEARCH_BELOW": "7",
    }
    cfg = load_config(path, environ=environ)
    assert cfg.postgres_password == "from-env-secret"
    assert cfg.postgres_host == "pg.internal"
    assert cfg.postgres_port == 6543
    assert cfg.device == "cuda"
    assert cfg.model_name == "google/siglip-base-patch16-224"
    assert cfg.top_k == 3
    assert cfg.settle_seconds == 0.25
    assert cfg.exact_search_below == 7
    assert cfg.postgres_user == "indexer"  # untouched keys keep the file's value


def test_environment_works_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={"IMAGE_SEARCH_DIMENSION": "768", "IMAGE_SEARCH_POSTGRES_USER": "svc"})
    assert (cfg.dimension, cfg.postgres_user) == (768, "svc")


def test_every_key_has_an_environment_variable(tmp_path):
    """IMAGE_SEARCH_<KEY>, upper case, '-' as '_', for every key the file accepts."""
    full = load_config(write(tmp_path / "a", {**ORIGINAL_KEYS, **SERVICE_KEYS}), environ={}).to_json_dict(redact=False)
    environ = {"IMAGE_SEARCH_" + key.upper().replace("-", "_"): str(value).lower() if isinstance(value, bool)
               else str(value) for key, value in full.items()}
    from_env = load_config(None, environ=environ)
    assert from_env == load_config(write(tmp_path / "b", full), environ={})


def test_environment_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "conf", {"source-directory": "in-file"})
    cfg = load_config(path, environ={"IMAGE_SEARCH_SOURCE_DIRECTORY": "from-env",
                                     "IMAGE_SEARCH_OUTPUT_DIRECTORY": str(tmp_path / "abs-out")})
    assert cfg.source_directory == tmp_path / "from-env"
    assert cfg.output_directory == tmp_path / "abs-out"


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False), ("OFF", False),
])
def test_booleans_from_environment_strings(tmp_path, text, expected):
    path = write(tmp_path / "conf", {"cleanup-on-exit": not expected})
    assert load_config(path, environ={"IMAGE_SEARCH_CLEANUP_ON_EXIT": text}).cleanup_on_exit is expected


@pytest.mark.parametrize(("variable", "text", "attr", "expected"), [
    ("IMAGE_SEARCH_TOP_K", "42", "top_k", 42),
    ("IMAGE_SEARCH_TOP_K", " 42 ", "top_k", 42),
    ("IMAGE_SEARCH_BATCH_SIZE", "1", "batch_size", 1),
    ("IMAGE_SEARCH_MAX_IMAGE_PIXELS", "1000000", "max_image_pixels", 1_000_000),
    ("IMAGE_SEARCH_RESCAN_INTERVAL", "30", "rescan_interval", 30.0),
    ("IMAGE_SEARCH_SETTLE_SECONDS", "1.5", "settle_seconds", 1.5),
])
def test_numbers_from_environment_strings(tmp_path, monkeypatch, variable, text, attr, expected):
    monkeypatch.chdir(tmp_path)
    value = getattr(load_config(None, environ={variable: text}), attr)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("variable", "text", "key"), [
    ("IMAGE_SEARCH_TOP_K", "ten", "top-k"),
    ("IMAGE_SEARCH_TOP_K", "1.5", "top-k"),
    ("IMAGE_SEARCH_CLEANUP_ON_EXIT", "maybe", "cleanup-on-exit"),
    ("IMAGE_SEARCH_SETTLE_SECONDS", "soon", "settle-seconds"),
    ("IMAGE_SEARCH_POSTGRES_PORT", "postgres", "postgres-port"),
])
def test_bad_environment_values_name_the_key(tmp_path, monkeypatch, variable, text, key):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={variable: text})
    assert f"'{key}'" in str(info.value)


def test_unrelated_environment_variables_are_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={"PATH": "/usr/bin", "IMAGE_SEARCHX": "1", "HOME": "/root",
                                     "IMAGE_SEARCH_TESTS_COLD": "1", "IMAGE_SEARCH_TOPK": ""})
    assert cfg.top_k == 10


@pytest.mark.parametrize(("name", "expected"), [
    ("IMAGE_SEARCH_TOPK", "environment variable IMAGE_SEARCH_TOPK names no config key: did you mean "
                          "IMAGE_SEARCH_TOP_K? Remove it or fix its spelling"),
    ("IMAGE_SEARCH_POSTGRES_PASSWD", "did you mean IMAGE_SEARCH_POSTGRES_PASSWORD?"),
    ("IMAGE_SEARCH_COLOUR", "environment variable IMAGE_SEARCH_COLOUR names no config key: Remove it"),
])
def test_a_misspelt_environment_variable_is_refused_as_an_unknown_key(tmp_path, monkeypatch, name, expected):
    """It was ignored: the setting it meant was silently not made (top-k stayed 10)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={name: "5"})
    assert expected in str(info.value) and "5" not in str(info.value)  # a password's value is never shown


def test_a_rescan_interval_is_off_or_at_least_a_second(tmp_path):
    assert load_config(write(tmp_path, {"rescan-interval": 0}), environ={}).rescan_interval == 0
    assert load_config(write(tmp_path, {"rescan-interval": 1}), environ={}).rescan_interval == 1
    assert error_for(tmp_path, {"rescan-interval": 0.5}) == (
        "config key 'rescan-interval' must be 0 or from 1 to 31,536,000 (seconds between rescans, at most a year; "
        "0 turns them off), got 0.5")


def test_process_environment_is_used_when_no_mapping_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGE_SEARCH_TOP_K", "17")
    assert load_config(None).top_k == 17


# --------------------------------------------------------------------------------------------------
# Errors that name the key and the fix
# --------------------------------------------------------------------------------------------------


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    message = error_for(tmp_path, {**ORIGINAL_KEYS, "sorce-directory": "typo"})
    assert "'sorce-directory'" in message
    assert "unknown key" in message
    assert "source-directory" in message  # the fix: the known keys are listed


def test_underscore_spelling_is_an_unknown_key(tmp_path):
    assert "'top_k'" in error_for(tmp_path, {"top_k": 5})


@pytest.mark.parametrize(("key", "value"), [
    ("top-k", "10"),
    ("top-k", 2.5),
    ("top-k", True),
    ("dimension", None),
    ("postgres-port", "5432"),
    ("resize-width", [1024]),
    ("cleanup-on-exit", "false"),
    ("cleanup-on-exit", 0),
    ("settle-seconds", "1"),
    ("settle-seconds", False),
    ("source-directory", 5),
    ("source-directory", None),
    ("device", 1),
    ("model-name", {"name": "clip"}),
    ("postgres-host", 127001),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, key, value):
    assert f"'{key}'" in error_for(tmp_path, {key: value})


@pytest.mark.parametrize("device", ["gpu", "CUDA", "mps", "", "cuda:0"])
def test_bad_device_is_an_error_naming_the_key_and_the_choices(tmp_path, device):
    message = error_for(tmp_path, {"device": device})
    assert "'device'" in message
    assert "auto" in message and "cuda" in message and "cpu" in message


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_each_valid_device(tmp_path, device):
    assert load_config(write(tmp_path, {"device": device}), environ={}).device == device


def test_bad_device_from_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'device'"):
        load_config(None, environ={"IMAGE_SEARCH_DEVICE": "tpu"})


@pytest.mark.parametrize(("key", "value"), [
    ("dimension", 0), ("dimension", -1), ("resize-width", 0), ("resize-height", -5), ("top-k", 0),
    ("batch-size", 0), ("max-image-pixels", 0), ("ef-search", 0),
    ("postgres-port", 0), ("postgres-port", 65536), ("settle-seconds", -1), ("rescan-interval", -0.5),
    ("member-lease-seconds", 0), ("burst-seconds", -1), ("exact-search-below", -1),
])
def test_out_of_range_values_name_the_key(tmp_path, key, value):
    assert f"'{key}'" in error_for(tmp_path, {key: value})


FLOAT_KEYS = ["settle-seconds", "rescan-interval", "member-lease-seconds", "similar-min-similarity", "burst-seconds"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_in_the_file_are_refused_for_every_float_key(tmp_path, key, value):
    """json.dumps writes NaN and Infinity, and json.loads reads them back: a file can hold them."""
    message = error_for(tmp_path, {key: value})
    assert message == f"config key '{key}' must be a finite number, got {value!r}"


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-Infinity", "1e999"])
def test_nan_and_infinity_from_the_environment_are_refused_for_every_float_key(tmp_path, monkeypatch, key, text):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"IMAGE_SEARCH_" + key.upper().replace("-", "_"): text})
    assert str(info.value) == f"config key '{key}' must be a finite number, got {text!r}"


def test_a_huge_number_in_the_file_reads_as_infinity_and_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"settle-seconds": 1e999}')
    with pytest.raises(ConfigError, match="'settle-seconds' must be a finite number"):
        load_config(path, environ={})


@pytest.mark.parametrize(("key", "value", "why"), [
    ("batch-size", 100_000_000, "held in memory"),
    ("batch-size", 257, "held in memory"),
    ("top-k", 1001, "hits per query"),
    ("ef-search", 1001, "hnsw.ef_search"),
    ("max-image-pixels", 10**12, "decompression-bomb guard"),
    ("resize-width", 65_536, "JPEGs"),
    ("resize-height", 10**9, "JPEGs"),
    ("dimension", 4001, "HNSW"),
    ("exact-search-below", 2**63, "bigint"),
    ("settle-seconds", 1e9, "at most a year"),
    ("rescan-interval", 1e300, "at most a year"),
    ("member-lease-seconds", 1e300, "at most a year"),
    ("burst-seconds", 1e12, "at most a year"),
])
def test_numbers_too_large_to_work_are_refused_with_the_bound_and_the_reason(tmp_path, key, value, why):
    message = error_for(tmp_path, {key: value})
    assert message.startswith(f"config key '{key}' must be ")
    assert why in message and repr(value) in message


def test_the_largest_numbers_that_work_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, {"batch-size": 256, "top-k": 1000, "ef-search": 1000,
                                       "max-image-pixels": 1_000_000_000, "resize-width": 65_535,
                                       "resize-height": 65_535, "dimension": 4000,
                                       "exact-search-below": 2**63 - 1, "settle-seconds": 31_536_000,
                                       "rescan-interval": 31_536_000, "member-lease-seconds": 31_536_000,
                                       "burst-seconds": 31_536_000, "similar-min-similarity": 1}), environ={})
    assert (cfg.batch_size, cfg.top_k, cfg.ef_search) == (256, 1000, 1000)
    assert cfg.exact_search_below == 2**63 - 1 and cfg.rescan_interval == 31_536_000.0


def test_a_huge_batch_size_from_the_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'batch-size' must be from 1 to 256 "):
        load_config(None, environ={"IMAGE_SEARCH_BATCH_SIZE": "100000000"})


@pytest.mark.parametrize(("variable", "text"), [("IMAGE_SEARCH_TOP_K", "1_0"), ("IMAGE_SEARCH_BATCH_SIZE", "\u0668"),
                                              ("IMAGE_SEARCH_SETTLE_SECONDS", "1_0.5"),
                                              ("IMAGE_SEARCH_SETTLE_SECONDS", "\u0661.\u0665")])
def test_a_number_from_the_environment_is_written_in_ascii_digits(tmp_path, monkeypatch, variable, text):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="must be an integer|must be a number"):
        load_config(None, environ={variable: text})


@pytest.mark.parametrize(("variable", "text", "field", "value"), [
    ("IMAGE_SEARCH_TOP_K", " 12 ", "top_k", 12), ("IMAGE_SEARCH_SETTLE_SECONDS", "2.5e-1", "settle_seconds", 0.25),
    ("IMAGE_SEARCH_SETTLE_SECONDS", ".5", "settle_seconds", 0.5), ("IMAGE_SEARCH_SETTLE_SECONDS", "3", "settle_seconds", 3.0)])
def test_numbers_from_the_environment_as_people_write_them_are_read(tmp_path, monkeypatch, variable, text, field, value):
    monkeypatch.chdir(tmp_path)
    assert getattr(load_config(None, environ={variable: text}), field) == value


def test_nan_in_a_config_built_in_code_is_refused_too():
    from image_search.config import _validate

    with pytest.raises(ConfigError, match="'settle-seconds'"):
        _validate(Config(settle_seconds=float("nan")))


def test_empty_model_name_is_an_error(tmp_path):
    assert "'model-name'" in error_for(tmp_path, {"model-name": "   "})


def test_a_source_directory_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    """It went on to claim processed-directory for the file, so that once corrected every start was refused."""
    (tmp_path / "photos.json").write_text("{}")
    reason = error_for(tmp_path, {"source-directory": "photos.json"})
    assert reason.startswith("config key 'source-directory': ") and "is a file, not a folder" in reason


def test_an_empty_variable_is_unset_not_the_working_directory_nor_an_empty_value(tmp_path, monkeypatch):
    """``IMAGE_SEARCH_SOURCE_DIRECTORY=`` (an EnvironmentFile line left empty) indexed the working directory;
    the shipped example's empty lines then stopped the start ('device' ... got ''). Empty is unset, as
    that file says: the config file's value, or the default, stands."""
    monkeypatch.chdir(tmp_path / "..")
    config = write(tmp_path, {"source-directory": "photos", "device": "cpu", "postgres-host": "db.example.com"})
    cfg = load_config(config, environ={"IMAGE_SEARCH_SOURCE_DIRECTORY": "", "IMAGE_SEARCH_DEVICE": "",
                                       "IMAGE_SEARCH_POSTGRES_HOST": " ", "IMAGE_SEARCH_BATCH_SIZE": ""})
    assert (cfg.source_directory, cfg.device, cfg.postgres_host) == (tmp_path / "photos", "cpu", "db.example.com")


def test_the_shipped_environment_file_leaves_the_config_as_it_is(tmp_path):
    """Installed as README says, its empty lines stopped the service at every start (exit 2)."""
    example = Path(__file__).parents[1] / "systemd" / "image-search.env.example"
    lines = [line.strip() for line in example.read_text().splitlines()]
    environ = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert environ and all(name.startswith("IMAGE_SEARCH_") for name in environ)
    config = write(tmp_path, {**ORIGINAL_KEYS})
    assert load_config(config, environ=environ) == load_config(config, environ={})


@pytest.mark.parametrize(("body", "words"), [
    ('{"settle-seconds": 1' + "0" * 400 + "}", "must be a finite number"),
    ('{"batch-size": ' + "1" * 5001 + "}", "holds a number too long to read"),
    ('{"model-name": ""}', "config key 'model-name' is empty"),
])
def test_numbers_too_long_for_python_and_an_empty_model_are_config_errors(tmp_path, body: str, words: str) -> None:
    """They crashed the start (exit 1, restarted for ever by systemd), or loaded the config's own folder as
    a model after the database was made."""
    (tmp_path / "config.json").write_text(body)
    with pytest.raises(ConfigError, match=re.escape(words)) as refused:
        load_config(tmp_path / "config.json", environ={})
    assert len(str(refused.value)) < 400
    with pytest.raises(ConfigError, match="'batch-size' must be an integer"):
        load_config(None, environ={"IMAGE_SEARCH_BATCH_SIZE": "1" + "0" * 5000})


@pytest.mark.parametrize(("key", "value"), [("source-directory", r"a\u0000b"), ("model-name", r"m\u0000"),
                                            ("postgres-password", r"p\u0000w"), ("postgres-host", r"/tmp/x\ud83d")])
def test_nul_and_half_characters_in_a_string_are_refused_naming_the_key(tmp_path, key, value):
    """They crashed the start (embedded null byte, surrogates not allowed), some after the database began."""
    config = tmp_path / "config.json"
    config.write_text('{"%s": "%s"}' % (key, value))
    with pytest.raises(ConfigError) as refused:
        load_config(config, environ={})
    assert str(refused.value).startswith(f"config key '{key}' holds NUL or half of a character")
    assert "p\x00w" not in str(refused.value)  # the password itself never shows


def test_a_relative_model_directory_is_the_config_folders_like_every_path_in_it(tmp_path, monkeypatch):
    """``"model-name": "../model"`` was resolved against the working directory: one config loaded another
    model, or none, depending on where it was started. A hub id stays a hub id."""
    (tmp_path / "model").mkdir()
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path / "model")
    assert load_config(write(tmp_path / "conf", {"model-name": "../model"}), environ={}).model_name == str(
        tmp_path / "conf" / ".." / "model")
    assert load_config(write(tmp_path / "conf", {"model-name": "jinaai/jina-clip-v2"}),
                       environ={}).model_name == "jinaai/jina-clip-v2"
    (tmp_path / "conf" / "local-clip").mkdir()
    assert load_config(write(tmp_path / "conf", {"model-name": "local-clip"}), environ={}).model_name == str(
        tmp_path / "conf" / "local-clip")


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors begin UTF-8 with a BOM: it was refused with Python's "decode using utf-8-sig"."""
    config = tmp_path / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"top-k": 7}).encode())
    assert load_config(config, environ={}).top_k == 7


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json", environ={})


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"top-k": 5,,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path, environ={})


@pytest.mark.parametrize("data", [[1, 2], "text", 5, None])
def test_json_that_is_not_an_object(tmp_path, data):
    assert "JSON object" in error_for(tmp_path, data)


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path, environ={})


# --------------------------------------------------------------------------------------------------
# The password never leaks
# --------------------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55word-xyz"


def test_password_is_redacted_in_to_json_dict_repr_and_str(tmp_path):
    cfg = load_config(write(tmp_path, {**ORIGINAL_KEYS, "postgres-password": SECRET}), environ={})
    assert cfg.postgres_password == SECRET  # usable for connecting
    shown = cfg.to_json_dict()
    assert shown["postgres-password"] == "***"
    assert SECRET not in json.dumps(shown)
    assert cfg.to_json_dict(redact=False)["postgres-password"] == SECRET
    for text in (repr(cfg), str(cfg), f"{cfg}", f"{cfg!r}", "%s" % (cfg,), str([cfg]), str({"cfg": cfg})):
        assert SECRET not in text
    assert "postgres-password" in repr(cfg)  # still shown as present, just redacted


def test_password_from_environment_is_redacted_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={"IMAGE_SEARCH_POSTGRES_PASSWORD": SECRET})
    assert cfg.postgres_password == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert SECRET not in json.dumps(cfg.to_json_dict())


@pytest.mark.parametrize("value", [123456789, ["s3cr3t"], {"pw": "s3cr3t"}, True])
def test_password_of_the_wrong_type_is_not_echoed_in_the_error(tmp_path, value):
    message = error_for(tmp_path, {"postgres-password": value})
    assert "'postgres-password'" in message
    assert str(value) not in message and repr(value) not in message
    assert "s3cr3t" not in message and "123456789" not in message


def test_password_does_not_leak_through_another_keys_error(tmp_path):
    message = error_for(tmp_path, {"postgres-password": SECRET, "device": "gpu"})
    assert SECRET not in message


def test_empty_password_is_valid(tmp_path):
    cfg = load_config(write(tmp_path, {**ORIGINAL_KEYS, "postgres-password": ""}), environ={})
    assert cfg.postgres_password == ""
    assert cfg.to_json_dict()["postgres-password"] == ""


def test_an_empty_password_variable_leaves_the_files(tmp_path):
    cfg = load_config(write(tmp_path, {**ORIGINAL_KEYS}), environ={"IMAGE_SEARCH_POSTGRES_PASSWORD": ""})
    assert cfg.postgres_password == ORIGINAL_KEYS["postgres-password"]


# --------------------------------------------------------------------------------------------------
# postgres-host: a host name or a Unix-socket directory
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["/var/run/postgresql", "/tmp", "localhost", "127.0.0.1", "db.example.com", "::1"])
def test_postgres_host_accepts_a_host_name_or_a_socket_directory(tmp_path, host):
    cfg = load_config(write(tmp_path, {"postgres-host": host}), environ={})
    assert cfg.postgres_host == host  # kept verbatim (a string for libpq, not resolved like a folder)
    assert isinstance(cfg.postgres_host, str)
    assert cfg.embedded_database is False


def test_postgres_host_socket_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={"IMAGE_SEARCH_POSTGRES_HOST": "/run/postgresql"})
    assert cfg.postgres_host == "/run/postgresql" and not cfg.embedded_database


def test_empty_postgres_host_means_the_embedded_database(tmp_path):
    assert load_config(write(tmp_path, {"postgres-host": ""}), environ={}).embedded_database is True


# --------------------------------------------------------------------------------------------------
# prepare_folders: the folders a run writes to
# --------------------------------------------------------------------------------------------------


def test_prepare_folders_creates_the_folders_a_run_writes_to(tmp_path):
    base = tmp_path / "tree"
    cfg = load_config(write(tmp_path, {"source-directory": "tree/src", "processed-directory": "tree/a/b/processed",
                                       "output-directory": "tree/out", "state-directory": "tree/state",
                                       "inbox-directory": "tree/inbox"}), environ={})
    prepare_folders(cfg)
    for sub in ("out", "state"):
        assert (base / sub).is_dir()
    # Only the start-up, which knows the index, may create these: missing, they may be on a disk not mounted.
    assert not (base / "src").exists() and not (base / "a").exists()
    assert not (base / "inbox").exists()
    prepare_folders(cfg, with_inbox=True)
    assert (base / "inbox").is_dir()
    prepare_folders(cfg, with_inbox=True)  # idempotent


@pytest.mark.parametrize("key", ["output-directory", "state-directory", "inbox-directory"])
def test_prepare_folders_error_for_an_uncreatable_folder_names_the_key(tmp_path, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = {"source-directory": "src", "processed-directory": "processed", "output-directory": "out",
            "state-directory": "state", "inbox-directory": "inbox"}
    data[key] = str(blocker / "sub")
    cfg = load_config(write(tmp_path, data), environ={})
    with pytest.raises(ConfigError) as info:
        prepare_folders(cfg, with_inbox=True)
    message = str(info.value)
    assert f"'{key}'" in message
    assert str(blocker / "sub") in message


def test_prepare_folders_error_when_the_path_is_a_file(tmp_path):
    blocker = tmp_path / "output-is-a-file"
    blocker.write_text("x")
    cfg = load_config(write(tmp_path, {"output-directory": str(blocker)}), environ={})
    with pytest.raises(ConfigError, match="'output-directory'"):
        prepare_folders(cfg)


def test_prepare_folders_error_for_a_read_only_folder_names_the_key():
    """Run as a user who cannot write the folder (root writes anywhere: as root this runs as nobody)."""
    with reachable_dir() as base:
        locked = base / "locked"
        locked.mkdir()
        give_to_unprivileged(locked)
        locked.chmod(0o500)
        conf = write(base / "conf", {"output-directory": str(locked / "output")})
        give_to_unprivileged(conf.parent)  # the other folders default to beside the config file
        cfg = load_config(conf, environ={})
        with unprivileged():
            with pytest.raises(ConfigError, match="'output-directory'") as info:
                prepare_folders(cfg)
        assert str(locked / "output") in str(info.value) and "Permission denied" in str(info.value)
        assert not (locked / "output").exists()


def test_a_folder_this_user_may_not_write_stays_a_config_error_not_a_disk_outage():
    """output/ is there, but not this user's to write (root writes anywhere: as root this runs as nobody):
    the owner or mode is the fix, and exit 2, which no restart mends. A read-only disk is not this
    (tests/test_failures.py: exit 7, restarted)."""
    with reachable_dir() as base:
        output = base / "output"
        output.mkdir(mode=0o555)
        conf = write(base / "conf", {"output-directory": str(output)})
        give_to_unprivileged(conf.parent)
        cfg = load_config(conf, environ={})
        with unprivileged():
            with pytest.raises(ConfigError) as info:
                prepare_folders(cfg)
        assert str(info.value) == (f"config key 'output-directory': {output} is not writable by this user ("
                                   f"{'nobody' if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name}): give it "
                                   "to this user (chown), or run as its owner, or configure another folder")


# --------------------------------------------------------------------------------------------------
# Folders that overlap
# --------------------------------------------------------------------------------------------------

APART = {"source-directory": "images", "inbox-directory": "inbox", "output-directory": "output",
         "processed-directory": "processed", "state-directory": "state"}
# The folders in which no other may lie (the same folder twice is refused for every pair).
HOLDING_NONE = ["source-directory", "inbox-directory", "processed-directory"]


def test_the_testers_layout_everything_inside_images_is_refused_before_anything_is_made(tmp_path):
    """The runaway: processed copies inside images/ were indexed again, images/processed/processed/... ."""
    conf = tmp_path / "conf"
    message = error_for(conf, {"source-directory": "images", "processed-directory": "images/processed",
                               "output-directory": "images/out", "inbox-directory": "images/inbox"})
    assert "lies inside 'source-directory' (" + str(conf / "images") + ")" in message
    assert "without end" in message
    assert sorted(p.name for p in conf.iterdir()) == ["config.json"]  # no folder was created


@pytest.mark.parametrize(("outer", "inner"), [(o, i) for o in HOLDING_NONE for i in APART if i != o])
def test_a_folder_inside_source_inbox_or_processed_is_refused_naming_both(tmp_path, outer, inner):
    conf = tmp_path / "conf"
    message = error_for(conf, {**APART, inner: f"{APART[outer]}/sub/{APART[inner]}"})
    assert message.startswith(f"config key '{inner}' ({conf / APART[outer] / 'sub' / APART[inner]}) lies inside "
                              f"'{outer}' ({conf / APART[outer]}): ")


@pytest.mark.parametrize(("one", "other"), list(itertools.combinations(APART, 2)))
def test_two_keys_naming_the_same_folder_are_refused(tmp_path, one, other):
    conf = tmp_path / "conf"
    message = error_for(conf, {**APART, other: f"./{APART[one]}/"})  # written otherwise, the same folder
    assert message.startswith("config keys '") and " are the same folder: " in message
    assert f"'{one}' ({conf / APART[one]})" in message and f"'{other}' ({conf / APART[one]})" in message


@pytest.mark.parametrize("layout", [
    {"state-directory": "var", "processed-directory": "var/processed", "output-directory": "var/output"},
    {"output-directory": "out", "processed-directory": "out/processed", "state-directory": "out/state"},
    {"state-directory": "var", "inbox-directory": "var/inbox", "source-directory": "var/images"},
    {"processed-directory": "images/../processed"},  # beside images/, though written through it
])
def test_nestings_that_harm_nothing_are_accepted(tmp_path, layout):
    conf = tmp_path / "conf"
    cfg = load_config(write(conf, {**APART, **layout}), environ={})
    prepare_folders(cfg, with_inbox=True)
    assert cfg.state_directory.is_dir()


@pytest.mark.parametrize("key", ["processed-directory", "output-directory", "source-directory", "inbox-directory"])
def test_a_folder_inside_the_embedded_databases_data_folder_is_refused(tmp_path, key):
    conf = tmp_path / "conf"
    message = error_for(conf, {**APART, key: "state/pgdata/x"})
    assert f"'{key}' ({conf / 'state' / 'pgdata' / 'x'}) lies inside {conf / 'state' / 'pgdata'}, the embedded" in message


def test_a_link_cannot_hide_a_folder_inside_the_source_even_before_it_exists(tmp_path):
    conf = tmp_path / "conf"
    (conf / "images").mkdir(parents=True)
    (conf / "cache").symlink_to(conf / "images", target_is_directory=True)
    message = error_for(conf, {**APART, "processed-directory": "cache/processed"})
    assert not (conf / "images" / "processed").exists()
    assert (f"'processed-directory' ({conf / 'cache' / 'processed'}, which is {conf / 'images' / 'processed'}) "
            f"lies inside 'source-directory' ({conf / 'images'})") in message


def test_a_link_to_the_inbox_as_output_is_the_same_folder(tmp_path):
    conf = tmp_path / "conf"
    (conf / "inbox").mkdir(parents=True)
    (conf / "results").symlink_to("inbox", target_is_directory=True)
    message = error_for(conf, {**APART, "output-directory": "results"})
    assert f"'output-directory' ({conf / 'results'}, which is {conf / 'inbox'}) are the same folder" in message


def test_a_linked_source_folder_holding_the_output_is_refused(tmp_path):
    """The source given through a link: what lies inside its target lies inside it."""
    conf = tmp_path / "conf"
    (tmp_path / "photos").mkdir()
    conf.mkdir()
    (conf / "images").symlink_to(tmp_path / "photos", target_is_directory=True)
    message = error_for(conf, {**APART, "output-directory": str(tmp_path / "photos" / "results")})
    assert f"lies inside 'source-directory' ({conf / 'images'}, which is {tmp_path / 'photos'})" in message


def test_an_overlap_from_the_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'processed-directory' .* lies inside 'source-directory'"):
        load_config(write(tmp_path / "conf", APART), environ={"IMAGE_SEARCH_PROCESSED_DIRECTORY": "conf/images/p"})


def test_a_loop_of_links_as_a_folder_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "a").symlink_to("b")
    (conf / "b").symlink_to("a")
    message = error_for(conf, {**APART, "output-directory": "a/results"})
    assert message.startswith(f"config key 'output-directory': {conf / 'a' / 'results'} cannot be resolved")


def test_config_is_immutable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    with pytest.raises(AttributeError):
        cfg.top_k = 99  # type: ignore[misc]
    assert isinstance(cfg, Config)


def test_a_key_given_twice_in_the_config_file_is_refused(tmp_path) -> None:
    """A line appended to the example ("cleanup-on-exit": false after its true) would lose to, or beat,
    the first unseen: refused, naming the key."""
    path = tmp_path / "config.json"
    path.write_text('{"top-k": 10, "cleanup-on-exit": true, "cleanup-on-exit": false}')
    with pytest.raises(ConfigError, match="key 'cleanup-on-exit' is given twice"):
        load_config(path, environ={})


# --------------------------------------------------------------------------------------------------
# Paths that cannot be followed: a config error naming the key, never a crash (exit 1, restarted for ever)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_env", [False, True])
def test_a_tilde_of_no_user_names_the_key(tmp_path, from_env):
    data, environ = (({}, {"IMAGE_SEARCH_OUTPUT_DIRECTORY": "~ghost-of-no-user/out"}) if from_env
                     else ({"output-directory": "~ghost-of-no-user/out"}, {}))
    message = error_for(tmp_path / "conf", data, environ)
    assert message.startswith("config key 'output-directory': ") and "give the whole path" in message


def test_a_loop_of_links_given_in_the_environment_names_the_key(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    message = error_for(tmp_path / "conf", {}, {"IMAGE_SEARCH_SOURCE_DIRECTORY": str(tmp_path / "a" / "images")})
    assert message.startswith(f"config key 'source-directory': {tmp_path / 'a' / 'images'} cannot be resolved")


@pytest.mark.parametrize("key", ["source-directory", "output-directory", "inbox-directory"])
def test_a_folder_behind_one_this_user_may_not_enter_names_the_key(key):
    """A home folder of mode 0700 (or /home under the unit's ProtectHome=yes): the first stat of the folder was
    a PermissionError, a crash. Run as ``nobody`` where this is root."""
    with reachable_dir() as base:
        home = base / "home"
        (home / "pictures").mkdir(parents=True)
        home.chmod(0o700)  # root's
        conf = write(base / "conf", {key: str(home / "pictures")})
        give_to_unprivileged(conf.parent)
        with unprivileged(), pytest.raises(ConfigError) as info:
            load_config(conf, environ={})
        assert str(info.value).startswith(f"config key '{key}': this user (")
        assert f"may not reach {home / 'pictures'} (Permission denied)" in str(info.value)


def test_a_link_to_a_folder_on_a_disk_not_mounted_is_waited_for_not_refused(tmp_path):
    """A folder that is a link onto a disk not mounted yet: "File exists", exit 2, which systemd never restarts.
    Now the disk's state, exit 7, restarted until it is mounted."""
    from image_search.errors import OutputUnwritable

    (tmp_path / "inbox-link").symlink_to(tmp_path / "mnt" / "nas" / "inbox")
    cfg = load_config(write(tmp_path / "conf", {**APART, "inbox-directory": str(tmp_path / "inbox-link")}), environ={})
    with pytest.raises(OutputUnwritable, match=f"{tmp_path / 'inbox-link'} is a link to {tmp_path / 'mnt'}"):
        prepare_folders(cfg, with_inbox=True)
    (tmp_path / "mnt" / "nas" / "inbox").mkdir(parents=True)  # mounted
    prepare_folders(cfg, with_inbox=True)


def test_a_folder_named_in_bytes_that_are_not_utf8_can_be_given_in_the_environment(tmp_path):
    """A folder named in Latin-1 (``Fotos-été`` as E9 bytes): the environment holds its bytes, which were
    refused as "half of a character". The name as it is on disk is the folder."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/Fotos-\xe9t\xe9"))
    folder.mkdir()
    cfg = load_config(write(tmp_path / "conf", {}), environ={"IMAGE_SEARCH_SOURCE_DIRECTORY": str(folder)})
    assert os.fsencode(cfg.source_directory) == os.fsencode(tmp_path) + b"/Fotos-\xe9t\xe9"
    message = error_for(tmp_path / "conf", {}, {"IMAGE_SEARCH_POSTGRES_USER": "caf\udce9"})  # not a name: refused
    assert message.startswith("config key 'postgres-user' holds NUL or half of a character")
