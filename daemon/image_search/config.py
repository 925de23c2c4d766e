"""Configuration: one frozen dataclass read from a JSON file, overridable from the environment.

The JSON keys are those of the original tool (``source-directory``, ``postgres-host``...), plus
what the service needs. ``IMAGE_SEARCH_<KEY>`` (upper case, ``-`` as ``_``) overrides any key, so
systemd can pass secrets through an EnvironmentFile.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entries import FollowLinks, LinkPolicy
from .errors import ExitCode, ImageSearchError, OutputUnwritable, is_disk_outage, read_only, unwritable
from .names import has_surrogate
from .query import MAX_TOP_K

# The largest near-copy distance the pair search handles (``groups.MOST_NEAR_COPY_DISTANCE``, which
# imports numpy: this module stays light).
MOST_NEAR_COPY_DISTANCE = 16

ENV_PREFIX = "IMAGE_SEARCH_"
# The test suite's own switches (tests/support): not config keys, and passed on to every service it starts.
TEST_ENV_PREFIX = ENV_PREFIX + "TESTS_"
REDACTED = "***"
DEVICES = ("auto", "cuda", "cpu")
_FOLLOW_CHOICES = tuple(f.value for f in FollowLinks)


class ConfigError(ImageSearchError):
    """A configuration problem the user must fix; the message names the key and the fix."""

    exit_code = ExitCode.USAGE
    event = "config_error"


@dataclass(frozen=True)
class Config:
    source_directory: Path = Path("images")
    processed_directory: Path = Path("processed")
    output_directory: Path = Path("output")
    inbox_directory: Path = Path("inbox")
    state_directory: Path = Path("state")
    device: str = "auto"
    model_name: str = "jinaai/jina-clip-v2"
    dimension: int = 1024
    resize_width: int = 1024
    resize_height: int = 1024
    postgres_host: str = ""
    postgres_port: int = 5432
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_database: str = "postgres"
    top_k: int = 10
    batch_size: int = 16
    cleanup_on_exit: bool = True
    # Decompression-bomb guard: images above this many pixels are refused (Pillow only warns).
    max_image_pixels: int = 178_956_970
    # Service: seconds a file's size and mtime must stay unchanged before it is read.
    settle_seconds: float = 1.0
    # Service: seconds between light rescans of the watched folders; 0 disables them.
    rescan_interval: float = 0.0
    # Search: HNSW candidate list size; tables below exact-search-below rows are scanned exactly.
    ef_search: int = 100
    exact_search_below: int = 10_000
    # Several services, one index: the user's statement that several services (hosts) share this
    # database and these folders. Membership and claims run either way; this key only insists on a
    # server they can all reach.
    shared_index: bool = False
    # A member whose heartbeat is older than this is taken for dead: its claims are taken over and it
    # no longer counts when the last one decides whether cleanup-on-exit empties the table.
    member_lease_seconds: float = 30.0
    # With the model on CUDA: decode plain JPEGs on the GPU (nvJPEG) in batches; false keeps every
    # decode on the CPU workers. Either way a file gets the same identity (the MD5 of its bytes).
    gpu_jpeg_decode: bool = True
    # Compile the vision tower's blocks with torch.compile at start (compiled.py): slower starts, for
    # faster forward passes where the backend pays (unmeasured on a GPU here; see the README).
    compile_model: bool = False
    # Which symbolic links in source-directory and the inbox are followed: "inside" (the default: a link
    # whose target stays inside the folder), "all" or "none". See entries.LinkPolicy.
    follow_symlinks: str = FollowLinks.INSIDE.value
    # Duplicates report (``duplicates``): two pictures are near-copies when their perceptual hashes
    # differ in at most this many bits of 255 (``phash``); similar when their embeddings' cosine
    # similarity is at least similar-min-similarity (0: the model family's default,
    # ``duplicates.similar_threshold``) and, where both have a date taken, they were taken within
    # burst-seconds of each other.
    near_copy_max_distance: int = 10
    similar_min_similarity: float = 0.0
    burst_seconds: float = 30.0

    @property
    def embedded_database(self) -> bool:
        return not self.postgres_host

    @property
    def embedded_data_directory(self) -> Path:
        """Where the embedded PostgreSQL keeps its data (with no postgres-host): initdb wants it its own."""
        return self.state_directory / "pgdata"

    @property
    def source_links(self) -> LinkPolicy:
        """How reads in source-directory treat symbolic links: never into the service's other folders."""
        own = tuple((key, getattr(self, _FIELDS[key].name)) for key in FOLDER_KEYS if key != "source-directory")
        return LinkPolicy(FollowLinks(self.follow_symlinks), self.source_directory, own_folders=own)

    @property
    def inbox_links(self) -> LinkPolicy:
        """How reads in the inbox treat symbolic links (the same rule as source-directory)."""
        return LinkPolicy(FollowLinks(self.follow_symlinks), self.inbox_directory, key="inbox-directory")

    def to_json_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The effective configuration under its JSON key names, password redacted by default."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            if redact and field.name == "postgres_password" and value:
                value = REDACTED
            out[_json_key(field.name)] = value
        return out

    def __repr__(self) -> str:  # never let the password reach a log line through repr()
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_json_dict().items())
        return f"Config({fields})"


def _json_key(field_name: str) -> str:
    return field_name.replace("_", "-")


_FIELDS = {_json_key(f.name): f for f in dataclasses.fields(Config)}
_DEFAULTS = Config()


def _field_type(name: str) -> type:
    return type(getattr(_DEFAULTS, name))


def _coerce(key: str, value: Any, *, from_env: bool) -> Any:
    """Check (JSON) or parse (environment strings) one value against its field's type."""
    field = _FIELDS[key]
    want = _field_type(field.name)
    shown = REDACTED if key == "postgres-password" else repr(value)  # the password never reaches an error
    if want is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {shown}")
    if want is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {shown}")
        if isinstance(value, int):
            return value
        if from_env and isinstance(value, str) and _ENV_INTEGER.fullmatch(value.strip()) and len(value.strip()) < 100:
            return int(value.strip())
        raise ConfigError(f"config key '{key}' must be an integer, got {_short(shown)}")
    if want is float:
        number = _as_float(value, from_env=from_env)
        if number is None:
            raise ConfigError(f"config key '{key}' must be a number, got {_short(shown)}")
        # JSON's NaN and Infinity (and 1e999) parse, as do "nan" and "inf" from the environment: NaN
        # compares false with every bound, so it would pass them all, and an infinite wait never ends.
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {_short(shown)}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' must be a string, got {shown}")
    # A folder's name from the environment is the bytes given, which Python holds as surrogates where they
    # are not UTF-8 (a folder named in Latin-1): the name as it is on disk, not half of a character.
    if "\0" in value or (has_surrogate(value) and not (from_env and issubclass(want, Path))):
        raise ConfigError(f"config key '{key}' holds NUL or half of a character (a \\u escape of a lone "
                          f"surrogate), which no name, address or password holds: write it as text")
    if issubclass(want, Path):
        if not value.strip():  # Path("") is the working directory: an empty override read as "here"
            raise ConfigError(f"config key '{key}' is empty: give a folder (or leave the key out for its default)")
        try:
            return Path(value).expanduser()
        except RuntimeError:  # ~name of no user, or ~ where this user has no home
            raise ConfigError(f"config key '{key}': {_short(shown)} starts with a ~ whose home folder this user "
                              "cannot tell (no such user, or no home): give the whole path") from None
    return value


def _short(shown: str) -> str:
    """A refused value as an error shows it: at most 60 characters (a number of 5,000 digits is one line)."""
    return shown if len(shown) <= 60 else f"{shown[:40]}... ({len(shown)} characters)"


# What a number in the environment may look like: ASCII digits as in JSON (Python's int() and float()
# would also take "1_0" and other scripts' digits, which no one means in a config), and for floats the
# words nan and inf, so that their refusal says why.
_ENV_INTEGER = re.compile(r"[+-]?[0-9]+")
_ENV_FLOAT = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)",
                        re.IGNORECASE)


def _as_float(value: Any, *, from_env: bool) -> float | None:
    """A JSON number, or an environment string that reads as one; None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: as infinite, refused as such
            return math.inf
    if from_env and isinstance(value, str) and _ENV_FLOAT.fullmatch(value.strip()):
        return float(value.strip())
    return None


@dataclass(frozen=True)
class Bounds:
    """The values a numeric key takes, and why they stop there (the error shows both)."""

    least: int
    most: int
    why: str
    least_excluded: bool = False  # any number above ``least``, however small
    zero_is_off: bool = False  # 0 too, below ``least``: it turns the thing off

    def holds(self, value: float) -> bool:
        above = value > self.least if self.least_excluded else value >= self.least
        return (above and value <= self.most) or (self.zero_is_off and value == 0)

    def describe(self) -> str:
        low = f"above {self.least:,} and at most" if self.least_excluded else f"from {self.least:,} to"
        return f"{'0 or ' if self.zero_is_off else ''}{low} {self.most:,} ({self.why})"


# A year: a longer wait is no setting but a typo, and PostgreSQL's intervals (the fleet's lease) end
# far sooner than the largest double.
MOST_SECONDS = 365 * 24 * 3600
# Each picture of a batch is held decoded for the model (3 MB at 512 pixels), two batches in flight:
# 256 (the most the GPU's own sizing picks, embed._batch_that_fits) already holds about 1.5 GB.
MOST_BATCH_SIZE = 256
# A picture is decoded whole, at 3 bytes a pixel or more, in each of the worker processes (one per core).
MOST_IMAGE_PIXELS = 1_000_000_000
JPEG_MOST_SIDE = 65_535
PGVECTOR_MOST_EF_SEARCH = 1_000
PGVECTOR_MOST_HNSW_DIMENSIONS = 4_000
POSTGRES_MOST_BIGINT = 2**63 - 1

NUMBER_BOUNDS: dict[str, Bounds] = {
    # Below this, Embedder.load still refuses a dimension the model cannot produce.
    "dimension": Bounds(1, PGVECTOR_MOST_HNSW_DIMENSIONS, "pgvector's HNSW index on halfvec takes no more"),
    "resize-width": Bounds(1, JPEG_MOST_SIDE, "pixels; the processed copies are JPEGs, whose sides stop there"),
    "resize-height": Bounds(1, JPEG_MOST_SIDE, "pixels; the processed copies are JPEGs, whose sides stop there"),
    "postgres-port": Bounds(1, 65_535, "a TCP port"),
    "top-k": Bounds(1, MAX_TOP_K, "hits per query, as a query's own top-k"),
    "batch-size": Bounds(1, MOST_BATCH_SIZE, "each picture of a batch is held in memory decoded for the model, "
                                             "two batches at a time: a larger batch takes memory, not time"),
    "max-image-pixels": Bounds(1, MOST_IMAGE_PIXELS, "the decompression-bomb guard: a picture is decoded whole, "
                                                     "3 bytes a pixel, in each worker process at once"),
    "ef-search": Bounds(1, PGVECTOR_MOST_EF_SEARCH, "pgvector's hnsw.ef_search takes no more"),
    "exact-search-below": Bounds(0, POSTGRES_MOST_BIGINT, "rows; 0 always searches through the index; "
                                                          "PostgreSQL counts in a bigint"),
    "near-copy-max-distance": Bounds(0, MOST_NEAR_COPY_DISTANCE, "bits of 255 in which two near-copies' "
                                                                 "perceptual hashes may differ"),
    "settle-seconds": Bounds(0, MOST_SECONDS, "seconds, at most a year"),
    # A rescan lists every watched folder and compares it with the table: 20,000 unchanged files took
    # about half a second of CPU (README "Rescans"). A fraction of a second apart, that is a core kept busy.
    "rescan-interval": Bounds(1, MOST_SECONDS, "seconds between rescans, at most a year; 0 turns them off",
                              zero_is_off=True),
    # At least 5: heartbeats come every 2 s, and a member judges the others' by its own lease.
    "member-lease-seconds": Bounds(5, MOST_SECONDS, "seconds: a heartbeat comes every 2 s; at most a year"),
    "similar-min-similarity": Bounds(0, 1, "a cosine similarity; 0 takes the model family's default"),
    "burst-seconds": Bounds(0, MOST_SECONDS, "seconds, at most a year"),
}


def _check_numbers(cfg: Config) -> None:
    for key, bounds in NUMBER_BOUNDS.items():
        value = getattr(cfg, _FIELDS[key].name)
        if not bounds.holds(value):  # NaN holds no bounds: a Config built in code is refused too
            raise ConfigError(f"config key '{key}' must be {bounds.describe()}, got {value!r}")


FOLDER_KEYS = ("source-directory", "inbox-directory", "processed-directory", "output-directory", "state-directory")
# The folders whose sub-folders the user's files name, so that no other folder may lie inside them, and why.
HOLDS_NO_OTHER_FOLDER = {
    "source-directory": "every file in it is indexed as a picture, so the queries, results, processed copies "
                        "and database files in a folder inside it would be too (processed copies of processed "
                        "copies, without end)",
    "inbox-directory": "a query document takes the folder named after it along into its result (or failed/)",
    "processed-directory": "it mirrors source-directory's sub-folders, so processed copies can be written into "
                           "a folder inside it",
}


def _real_folder(key: str, folder: Path) -> Path:
    """``folder`` with every link on its way resolved; the part that does not exist yet is taken as written
    (it cannot be a link until it is made)."""
    try:
        return folder.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of links, before Python 3.13
        raise ConfigError(f"config key '{key}': {folder} cannot be resolved ({exc})") from None


def _check_reachable(key: str, folder: Path) -> None:
    """A folder behind one this user may not enter (a home folder of mode 0700 or 0750; /home, which the
    unit's ProtectHome=yes hides) is a ConfigError naming the key, not an error at its first use: that
    ended as a crash (exit 1), which systemd restarts for ever."""
    try:
        os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError as exc:
        raise ConfigError(
            f"config key '{key}': this user ({_user_name()}) may not reach {folder} ({exc.strerror}): it needs "
            "search (x) permission on every folder above it (chmod o+x, or a group), or configure a folder "
            "outside it; under systemd, the unit's ProtectHome=yes hides /home, and ProtectSystem=strict makes "
            "all but ReadWritePaths read-only") from None
    except OSError:
        pass  # a loop of links is named by ``_check_folders_apart``; a stale share or an I/O error by its first use


def _shown_folder(key: str, folder: Path, real: Path) -> str:
    return f"'{key}' ({folder})" if folder == real else f"'{key}' ({folder}, which is {real})"


def _check_folders_apart(cfg: Config) -> None:
    """Refuse two keys naming one folder, or a folder inside one of HOLDS_NO_OTHER_FOLDER: compared with
    their links resolved, so a link cannot hide the overlap."""
    given = {key: getattr(cfg, _FIELDS[key].name) for key in FOLDER_KEYS}
    real = {key: _real_folder(key, folder) for key, folder in given.items()}
    shown = {key: _shown_folder(key, given[key], real[key]) for key in FOLDER_KEYS}
    for one, other in itertools.combinations(FOLDER_KEYS, 2):
        if real[one] == real[other]:
            raise ConfigError(f"config keys {shown[one]} and {shown[other]} are the same folder: each needs its own, "
                              "or the files one writes there the other reads, moves or overwrites. "
                              "Give them folders side by side.")
    if cfg.embedded_database:
        pgdata = _real_folder("state-directory", cfg.embedded_data_directory)
        for key in FOLDER_KEYS:
            if key != "state-directory" and real[key].is_relative_to(pgdata):
                raise ConfigError(f"config key {shown[key]} lies inside {pgdata}, the embedded PostgreSQL's data "
                                  f"folder, which PostgreSQL alone may write. Give '{key}' a folder outside it.")
    for outer, why in HOLDS_NO_OTHER_FOLDER.items():
        for inner in FOLDER_KEYS:
            if inner != outer and real[inner].is_relative_to(real[outer]):
                raise ConfigError(f"config key {shown[inner]} lies inside {shown[outer]}: {why}. "
                                  f"Give '{inner}' a folder outside it, side by side.")


def _validate(cfg: Config) -> None:
    if cfg.follow_symlinks not in _FOLLOW_CHOICES:
        raise ConfigError(f"config key 'follow-symlinks' must be one of {', '.join(_FOLLOW_CHOICES)}, "
                          f"got {cfg.follow_symlinks!r}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"config key 'device' must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    _check_numbers(cfg)
    if cfg.shared_index and cfg.embedded_database:
        raise ConfigError(
            "config key 'shared-index' is true but 'postgres-host' is empty: the embedded PostgreSQL lives in one "
            "machine's state-directory and cannot be shared. Run one server all services reach (docker-compose.yml "
            "in the repository runs one) and set 'postgres-host' (and the other postgres-* keys) to it."
        )
    if not cfg.model_name.strip():
        raise ConfigError("config key 'model-name' is empty: give a Hugging Face model id or a local model directory")
    for key in FOLDER_KEYS:
        _check_reachable(key, getattr(cfg, _FIELDS[key].name))
    if cfg.source_directory.exists() and not cfg.source_directory.is_dir():
        raise ConfigError(f"config key 'source-directory': {cfg.source_directory} is a file, not a folder: "
                          "give the folder of the pictures")
    _check_folders_apart(cfg)


class _KeyTwice(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _keys_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of the config file: a key given twice (a line appended to an example) is refused, not
    silently the last one."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _KeyTwice(key)
        seen[key] = value
    return seen


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the JSON file at ``path`` (optional), apply ``IMAGE_SEARCH_*`` overrides, validate.

    Relative paths in the file are resolved against the file's folder, so a config works from any
    working directory; relative paths from the environment are resolved against the working directory.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            # utf-8-sig: a file saved by an editor that begins UTF-8 with a byte-order mark (Notepad) reads too.
            raw = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_keys_once)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        except ValueError as exc:  # a number of thousands of digits, which Python will not read as an int
            raise ConfigError(f"config file {path} holds a number too long to read ({exc}): write the value "
                              "the key needs") from None
        except _KeyTwice as exc:
            raise ConfigError(f"config file {path}: key '{exc.key}' is given twice (the last would win unseen): "
                              "keep the one you mean") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of keys, not {type(raw).__name__}")
        for key, value in raw.items():
            if key not in _FIELDS:
                raise ConfigError(
                    f"config file {path}: unknown key '{key}'. Remove it or fix its spelling; "
                    f"known keys: {', '.join(sorted(_FIELDS))}"
                )
            values[key] = _coerce(key, value, from_env=False)
        base = path.resolve().parent
    for key, value in values.items():
        if isinstance(value, Path) and not value.is_absolute():
            values[key] = base / value
    if "model-name" in values:
        values["model-name"] = _model_relative_to(base, values["model-name"])
    _check_environment_names(environ)
    for key in _FIELDS:
        env_name = _env_name(key)
        # Empty is unset, as systemd/image-search.env.example says: its lines ship empty, and read as
        # values they stopped the start ('device' must be one of ..., got '') or replaced the file's.
        if environ.get(env_name, "").strip():
            value = _coerce(key, environ[env_name], from_env=True)
            values[key] = _real_folder(key, value) if isinstance(value, Path) else value
    for key, field in _FIELDS.items():
        if key not in values and issubclass(_field_type(field.name), Path):  # PosixPath, not Path itself
            values[key] = (base / getattr(_DEFAULTS, field.name))
    cfg = Config(**{_FIELDS[k].name: v for k, v in values.items()})
    _validate(cfg)
    return cfg


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace("-", "_").upper()


def _check_environment_names(environ: Mapping[str, str]) -> None:
    """Refuse an ``IMAGE_SEARCH_*`` variable that names no key, as the file refuses an unknown key: a
    misspelt one (``IMAGE_SEARCH_TOPK``) was ignored, and the setting it meant silently not made."""
    known = {_env_name(key) for key in _FIELDS}
    suffixes = [name.removeprefix(ENV_PREFIX) for name in known]
    for name in sorted(environ):
        if (name.startswith(ENV_PREFIX) and name not in known and not name.startswith(TEST_ENV_PREFIX)
                and environ[name].strip()):  # empty is unset, whatever it names
            # Compared without the prefix every name shares, which made any name close to some key.
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
            hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
            raise ConfigError(f"environment variable {name} names no config key: {hint}Remove it or fix its "
                              f"spelling (IMAGE_SEARCH_ and a key in upper case, '-' as '_')")


def _model_relative_to(base: Path, name: str) -> str:
    """A config file's 'model-name' that is a relative local directory, resolved against the file's folder as
    its other paths are (it was resolved against the working directory: one config loaded another model, or
    none, depending on where it was started). A hub id ("jinaai/jina-clip-v2") is left as it is, unless a
    folder of that name is beside the config. An empty one stays empty, for ``_validate`` to refuse (it
    was the config's own folder, loaded as a model after the database was made)."""
    if not name.strip() or Path(name).is_absolute() or name.startswith("~"):
        return name
    if name.startswith(("./", "../")) or (base / name).is_dir():
        return str(base / name)
    return name


def ensure_directories(cfg: Config, *, with_inbox: bool = False) -> None:
    """Create the folders the run writes to; a folder that cannot be created, or that this user may not
    write, is a ConfigError (``create_folder``, ``check_writable_folder``). ``source-directory`` is not one
    of them: whether it may be created depends on the index (``sync.ensure_source_folder``); nor is a
    missing ``processed-directory``, made at its first use only (``sync.claim_processed_folder``), nor
    ``output-directory`` (``output.prepare_output_folder``): missing or empty, either may be on a disk that
    is not mounted."""
    keys = ["processed-directory", "state-directory"]
    if with_inbox:
        keys.append("inbox-directory")
    for key in keys:
        folder: Path = getattr(cfg, _FIELDS[key].name)
        if key == "processed-directory" and not os.path.lexists(folder):
            continue
        create_folder(key, folder)
        check_writable_folder(key, folder)


def check_writable_folder(key: str, folder: Path) -> None:
    """A ConfigError when this user may not write into ``folder`` (config key ``key``). One on a read-only
    file system is the disk's state, not the config's: ``OutputUnwritable`` (exit 7, which systemd restarts
    until the disk is read-write again; exit 2 it never restarts)."""
    # access() says no for a read-only file system too: asked first, it is told apart.
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise read_only(folder, f"config key '{key}'")
    # The effective user's: every write is checked against its rights, not the real user's.
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=True):
        raise ConfigError(f"config key '{key}': {folder} is not writable by this user ({_user_name()}): "
                          "give it to this user (chown), or run as its owner, or configure another folder")


def _user_name() -> str:
    """The effective user's name (its number where it has none)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def create_folder(key: str, folder: Path) -> None:
    """``folder`` (config key ``key``) and its parents; a ConfigError naming the key when it cannot be,
    ``OutputUnwritable`` when the disk takes no write now (full, read-only: its state, not the config's)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        link = next((p for p in (folder, *folder.parents) if os.path.islink(p) and not os.path.exists(p)), None)
        if link is None:
            raise ConfigError(f"config key '{key}': cannot create {folder}: a file holds its name or a name on its "
                              "way: configure another folder, or move the file away") from None
        # A link to a folder on a disk not mounted yet: its state, which passes (exit 7, restarted), not the
        # config's (exit 2, never restarted).
        raise OutputUnwritable(f"config key '{key}': {link} is a link to {os.readlink(link)}, which is not "
                               "there: is its disk not mounted (yet)? Mount it, or make the folder it leads to") from None
    except OSError as exc:
        if is_disk_outage(exc) and (outage := unwritable(folder, f"config key '{key}': the folder", exc)):
            raise outage from None
        raise ConfigError(
            f"config key '{key}': cannot create {folder} ({exc.strerror}). "
            "Point it at a writable folder or create it with the right owner."
        ) from None
