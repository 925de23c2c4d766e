"""Configuration: one frozen dataclass read from a JSON file, overridable from the environment.

The JSON keys are those of the original tool (``source-directory``, ``postgres-host``...), plus
what the service needs. ``IMAGE_SEARCH_<KEY>`` (upper case, ``-`` as ``_``) overrides any key, so
systemd can pass secrets through an EnvironmentFile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entries import FollowLinks, LinkPolicy
from .errors import ExitCode, ImageSearchError

# The largest near-copy distance the pair search handles (``groups.MOST_NEAR_COPY_DISTANCE``, which
# imports numpy: this module stays light).
MOST_NEAR_COPY_DISTANCE = 16

ENV_PREFIX = "IMAGE_SEARCH_"
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
    def source_links(self) -> LinkPolicy:
        """How reads in source-directory treat symbolic links."""
        return LinkPolicy(FollowLinks(self.follow_symlinks), self.source_directory)

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
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {shown}")
    if want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {shown}")
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' must be a string, got {shown}")
    return Path(value).expanduser() if issubclass(want, Path) else value


def _validate(cfg: Config) -> None:
    if cfg.follow_symlinks not in _FOLLOW_CHOICES:
        raise ConfigError(f"config key 'follow-symlinks' must be one of {', '.join(_FOLLOW_CHOICES)}, "
                          f"got {cfg.follow_symlinks!r}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"config key 'device' must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    positive = ("dimension", "resize-width", "resize-height", "top-k", "batch-size", "max-image-pixels",
                "ef-search")
    for key in positive:
        if getattr(cfg, _FIELDS[key].name) <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer")
    if not 0 < cfg.postgres_port < 65536:
        raise ConfigError("config key 'postgres-port' must be a TCP port (1-65535)")
    if cfg.settle_seconds < 0 or cfg.rescan_interval < 0:
        raise ConfigError("config keys 'settle-seconds' and 'rescan-interval' must not be negative")
    if cfg.member_lease_seconds <= 0:
        raise ConfigError("config key 'member-lease-seconds' must be a positive number of seconds")
    if cfg.shared_index and cfg.embedded_database:
        raise ConfigError(
            "config key 'shared-index' is true but 'postgres-host' is empty: the embedded PostgreSQL lives in one "
            "machine's state-directory and cannot be shared. Run one server all services reach (docker-compose.yml "
            "in the repository runs one) and set 'postgres-host' (and the other postgres-* keys) to it."
        )
    if not 0 <= cfg.near_copy_max_distance <= MOST_NEAR_COPY_DISTANCE:
        raise ConfigError(f"config key 'near-copy-max-distance' must be 0 to {MOST_NEAR_COPY_DISTANCE} (bits of 255 "
                          f"in which two near-copies' perceptual hashes may differ), got {cfg.near_copy_max_distance}")
    if not 0 <= cfg.similar_min_similarity <= 1:
        raise ConfigError("config key 'similar-min-similarity' must be a cosine similarity from 0 to 1 "
                          f"(0: the model family's default), got {cfg.similar_min_similarity}")
    if cfg.burst_seconds < 0:
        raise ConfigError("config key 'burst-seconds' must not be negative")
    if not cfg.model_name.strip():
        raise ConfigError("config key 'model-name' is empty: give a Hugging Face model id or a local model directory")


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
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
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
    for key in _FIELDS:
        env_name = ENV_PREFIX + key.replace("-", "_").upper()
        if env_name in environ:
            value = _coerce(key, environ[env_name], from_env=True)
            values[key] = value.resolve() if isinstance(value, Path) else value
    for key, field in _FIELDS.items():
        if key not in values and issubclass(_field_type(field.name), Path):  # PosixPath, not Path itself
            values[key] = (base / getattr(_DEFAULTS, field.name))
    cfg = Config(**{_FIELDS[k].name: v for k, v in values.items()})
    _validate(cfg)
    return cfg


def ensure_directories(cfg: Config, *, with_inbox: bool = False) -> None:
    """Create the folders the run writes to; a folder that cannot be created is a ConfigError.
    ``source-directory`` is not one of them: whether it may be created depends on the index
    (``sync.ensure_source_folder``)."""
    keys = ["processed-directory", "output-directory", "state-directory"]
    if with_inbox:
        keys.append("inbox-directory")
    for key in keys:
        folder: Path = getattr(cfg, _FIELDS[key].name)
        create_folder(key, folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"config key '{key}': {folder} is not writable by this user")


def create_folder(key: str, folder: Path) -> None:
    """``folder`` (config key ``key``) and its parents; a ConfigError naming the key when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"config key '{key}': cannot create {folder} ({exc.strerror}). "
            "Point it at a writable folder or create it with the right owner."
        ) from None
