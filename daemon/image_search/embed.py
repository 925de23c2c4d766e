"""Embedding: one model loaded once through transformers, images in, L2-normalised float32 vectors out.

Two families are supported through the same ``from_pretrained`` path:
- jina-clip-v2 (remote code): ``encode_image`` with Matryoshka ``truncate_dim``;
- stock transformers CLIP and SigLIP: the model's image processor, then ``get_image_features``.
Text queries go through the same model's text tower (``embed_texts``): jina-clip-v2's ``encode_text``
with its ``retrieval.query`` task; CLIP/SigLIP: the model's tokenizer, then ``get_text_features``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

log = structlog.get_logger(__name__)


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says which model and what to do."""


class DimensionError(Exception):
    """The configured ``dimension`` is one the model cannot produce."""


def choose_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU falls back to the CPU with a warning."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        log.warning("cuda_unavailable", detail="device 'cuda' was requested but no CUDA GPU is usable; using the CPU")
    return torch.device("cpu")


def _is_local(model_name: str) -> bool:
    return Path(model_name).expanduser().is_dir()


def _looks_like_path(model_name: str) -> bool:
    return model_name.startswith(("/", "./", "../", "~")) or model_name.count("/") > 1 or "\\" in model_name


def _load_error(model_name: str, exc: BaseException) -> ModelLoadError:
    if _is_local(model_name):
        return ModelLoadError(
            f"model directory '{model_name}' cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check that it holds a complete transformers checkpoint (config.json, weights, preprocessor_config.json)."
        )
    if _looks_like_path(model_name):  # a hub id is "name" or "org/name"; advice about the hub cache would mislead
        return ModelLoadError(
            f"model directory '{model_name}' "
            + ("is a file, not a directory" if Path(model_name).expanduser().exists() else "does not exist")
            + ". Check config key 'model-name': give an existing "
            "local model directory or a Hugging Face model id (org/name)."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return ModelLoadError(
        f"model '{model_name}' is not in the local Hugging Face cache and could not be downloaded"
        + (" (HF_HUB_OFFLINE is set)" if offline else " (no network, or the id is misspelt)")
        + ". Check the name in config key 'model-name', download it once on a machine with network access "
        "(huggingface-cli download " + " ".join(_hub_repos_to_download(model_name)) + ") and copy the cache "
        "(HF_HOME), or point 'model-name' at a local directory."
    )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "jina" or "clip" (stock transformers CLIP/SigLIP)
    native_dimension: int
    matryoshka_dimensions: tuple[int, ...]


class Embedder:
    """A model kept in memory on one device. Use ``Embedder.load``; then ``embed_images`` any number of times."""

    def __init__(self, model: Any, processor: Any, info: ModelInfo, device: torch.device, dtype: torch.dtype,
                 dimension: int) -> None:
        self._model = model
        self._processor = processor
        self.info = info
        self.device = device
        self.dtype = dtype
        self.dimension = dimension
        self.max_batch = 64  # images per forward pass: sized to free GPU memory at load, lowered after an OOM

    @classmethod
    def load(cls, model_name: str, *, device: str = "auto", dimension: int | None = None) -> Embedder:
        """Load ``model_name`` (hub id or local directory) once; check it can produce ``dimension``."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        from huggingface_hub.utils import logging as hub_logging

        hf_logging.set_verbosity_error()  # their warnings about unused weights are noise in our journal
        hub_logging.set_verbosity_error()  # one line per download retry, too; a failure ends in our own line
        torch_device = choose_device(device)
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
        source = str(Path(model_name).expanduser()) if _is_local(model_name) else model_name
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=True)
            model = AutoModel.from_pretrained(source, trust_remote_code=True, torch_dtype=dtype)
        except (OSError, ValueError, ImportError) as exc:
            raise _load_error(model_name, exc) from None
        model = model.to(torch_device).eval()
        processor = None
        if hasattr(model, "encode_image"):
            family = "jina"
            matryoshka = tuple(int(d) for d in (getattr(config, "matryoshka_dimensions", None) or ()))
        elif hasattr(model, "get_image_features"):
            family = "clip"
            matryoshka = ()
            try:
                processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
            except (OSError, ValueError) as exc:
                raise _load_error(model_name, exc) from None
        else:
            raise ModelLoadError(
                f"model '{model_name}' ({type(model).__name__}) has neither encode_image (jina-clip) nor "
                "get_image_features (CLIP, SigLIP): it is not an image-text embedding model"
            )
        info = ModelInfo(model_name, family, 0, matryoshka)
        embedder = cls(model, processor, info, torch_device, dtype, dimension=0)
        embedder._text_side = _load_text_side(model, family, source, model_name)
        # One tiny forward pass tells the true output size (and warms the model up).
        native = embedder._forward([Image.new("RGB", (8, 8), (127, 127, 127))], truncate=None).shape[1]
        if torch_device.type == "cuda":
            embedder.max_batch = embedder._batch_that_fits()
        embedder.info = ModelInfo(model_name, family, native, matryoshka)
        embedder.dimension = check_dimension(embedder.info, dimension if dimension is not None else native)
        log.info("model_loaded", model=model_name, family=family, device=str(torch_device),
                 dtype=str(dtype).removeprefix("torch."), dimension=embedder.dimension, native_dimension=native)
        return embedder

    def _forward(self, images: Sequence[Image.Image], truncate: int | None) -> np.ndarray:
        with torch.inference_mode():
            if self.info.family == "jina":
                out = self._model.encode_image(list(images), batch_size=max(1, len(images)),
                                               truncate_dim=truncate, convert_to_numpy=False,
                                               convert_to_tensor=True, normalize_embeddings=False)
                features = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
            else:
                features = self._model.get_image_features(pixel_values=self._pixels(images))
                if truncate is not None:
                    features = features[:, :truncate]
            features = features.float()
            features = torch.nn.functional.normalize(features, dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def _batch_that_fits(self, probe: int = 4, ceiling: int = 256) -> int:
        """CUDA only: measure what one image of a forward pass costs and size batches to about 70% of
        the free memory (the out-of-memory backoff in ``embed_images`` remains the safety net)."""
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self._forward([Image.new("RGB", (512, 512), (127, 127, 127))] * probe, truncate=None)
            per_image = max(1, (torch.cuda.max_memory_allocated() - before) // probe)
            free, _ = torch.cuda.mem_get_info()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            log.warning("gpu_batch_probe_failed", reason=str(exc), batch_size=self.max_batch)
            return self.max_batch
        fits = int(max(1, min(ceiling, 0.7 * free // per_image)))
        log.info("gpu_batch_size", batch_size=fits, per_image_mb=round(per_image / 2**20, 1),
                 free_mb=round(free / 2**20))
        return fits

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's input tensor. Resizing and cropping stay uint8 on the CPU; the uint8 batch goes to
        the device (pinned, asynchronously, on CUDA) and is rescaled and normalised there."""
        geometry = _clip_geometry(self._processor)
        if geometry is None:  # a processor we do not mirror: let it do everything
            pixels = self._processor(images=list(images), return_tensors="pt")["pixel_values"]
            return pixels.to(self.device, self.dtype)
        batch = torch.from_numpy(np.stack([_resize_and_crop(im, geometry) for im in images])).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        mean = torch.tensor(geometry.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(geometry.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        return ((batch.to(torch.float32) * geometry.rescale - mean) / std).to(self.dtype)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images: an (n, dimension) float32 array of unit vectors.

        On a CUDA out-of-memory error the batch is split and the smaller size is kept for later
        batches, instead of dying.
        """
        if not images:
            return np.zeros((0, self.dimension), dtype=np.float32)
        truncate = None if self.dimension == self.info.native_dimension else self.dimension
        out: list[np.ndarray] = []
        start = 0
        while start < len(images):
            chunk = images[start:start + self.max_batch]
            try:
                out.append(self._forward(chunk, truncate))
            except torch.cuda.OutOfMemoryError:
                if self.max_batch == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_batch = max(1, (len(chunk) + 1) // 2)
                log.warning("gpu_out_of_memory", action="smaller batches", batch_size=self.max_batch)
                continue
            start += len(chunk)
        return np.concatenate(out)

    # --- text queries ------------------------------------------------------------------------------

    _text_side: _TextSide | None = None  # set by ``load``; None only for an Embedder built by hand

    @property
    def text_token_limit(self) -> int:
        """The most tokens of one query the text tower reads; longer queries are truncated to it."""
        return self._require_text_side().max_tokens

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed text queries: an (n, dimension) float32 array of unit vectors, comparable with the
        image vectors. A query longer than the model reads is truncated, with one warning line.

        Raises NoTextTower when this model cannot read text at all.
        """
        side = self._require_text_side()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        for text in texts:
            count = len(side.tokenizer(side.instruction + text, add_special_tokens=True, truncation=False)["input_ids"])
            if count > side.max_tokens:
                log.warning("text_query_truncated", tokens=count, limit=side.max_tokens,
                            detail=f"the model reads at most {side.max_tokens} tokens; the rest of the query is ignored",
                            query=_shorten(text, 80))
        with torch.inference_mode():
            if self.info.family == "jina":
                # Jina adds the task's instruction itself; its own default would cut at 512 tokens silently.
                out = self._model.encode_text(list(texts), task=JINA_QUERY_TASK, batch_size=max(1, len(texts)),
                                              truncate_dim=self.dimension, convert_to_numpy=False,
                                              convert_to_tensor=True, normalize_embeddings=False,
                                              max_length=side.max_tokens)
                features = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
            else:
                tokens = side.tokenizer(list(texts), padding=side.padding, truncation=True,
                                        max_length=side.max_tokens, return_tensors="pt")
                features = self._model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()
                                                            if k in ("input_ids", "attention_mask")})
            # Matryoshka: the leading `dimension` components, re-normalised (a no-op slice at full size).
            features = torch.nn.functional.normalize(features.float()[:, :self.dimension], dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def _require_text_side(self) -> _TextSide:
        side = self._text_side
        if side is None or side.tokenizer is None:
            raise NoTextTower(side.unavailable if side is not None and side.unavailable
                              else f"model '{self.info.name}' was loaded without its text side")
        return side


@dataclass(frozen=True)
class _Geometry:
    shortest_edge: int | None  # resize the short side to this (CLIP), or
    size: tuple[int, int] | None  # resize to exactly (width, height) (SigLIP)
    crop: tuple[int, int] | None  # centre crop (width, height)
    resample: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _clip_geometry(processor: Any) -> _Geometry | None:
    """What a CLIP/SigLIP image processor does, read from its settings; None if it does something else."""
    size = getattr(processor, "size", None) or {}
    if getattr(processor, "do_resize", True) is False or not getattr(processor, "do_normalize", True):
        return None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None
    if "shortest_edge" in size:
        shortest, exact = int(size["shortest_edge"]), None
    elif "height" in size and "width" in size:
        shortest, exact = None, (int(size["width"]), int(size["height"]))
    else:
        return None
    return _Geometry(
        shortest_edge=shortest, size=exact,
        crop=(int(crop["width"]), int(crop["height"])) if crop else None,
        resample=int(getattr(processor, "resample", Image.Resampling.BICUBIC)),
        rescale=float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),  # type: ignore[arg-type]
    )


def _resize_and_crop(image: Image.Image, g: _Geometry) -> np.ndarray:
    """Resize and crop as transformers' CLIP/SigLIP processors do, staying in uint8."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    if g.shortest_edge is not None:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = g.shortest_edge, int(g.shortest_edge * long / short)
        target = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        assert g.size is not None
        target = g.size
    if target != image.size:
        image = image.resize(target, resample=g.resample)
    if g.crop is not None:
        cw, ch = g.crop
        left, top = (image.width - cw) // 2, (image.height - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return np.asarray(image, dtype=np.uint8)


def check_dimension(info: ModelInfo, dimension: int) -> int:
    """The configured dimension if the model can produce it, else a DimensionError naming the fix."""
    if dimension == info.native_dimension:
        return dimension
    if info.family == "jina" and dimension < info.native_dimension and (
        not info.matryoshka_dimensions or dimension in info.matryoshka_dimensions
    ):
        return dimension
    allowed = sorted({*info.matryoshka_dimensions, info.native_dimension}) if info.family == "jina" else [info.native_dimension]
    raise DimensionError(
        f"config key 'dimension' is {dimension}, but model '{info.name}' produces "
        f"{' or '.join(str(a) for a in allowed)}-dimensional embeddings. Set 'dimension' to "
        f"{info.native_dimension if len(allowed) == 1 else 'one of ' + ', '.join(str(a) for a in allowed)}."
    )


# --- text queries: module-level helpers ------------------------------------------------------------

JINA_QUERY_TASK = "retrieval.query"  # jina-clip-v2's task for a search query (its LoRA/instruction choice)
# Used only when a tokenizer states no usable limit (transformers' "no limit" is a huge sentinel).
_FALLBACK_TOKEN_LIMIT = 512


class NoTextTower(Exception):
    """The loaded model cannot embed text (no text tower, or no tokenizer): text queries are impossible."""


@dataclass(frozen=True)
class _TextSide:
    """What reading text needs: the tokenizer (None when text is impossible, ``unavailable`` says why),
    the most tokens the tower reads, how to pad, and the instruction jina prepends to a query."""

    tokenizer: Any | None
    max_tokens: int
    padding: bool | str
    instruction: str
    unavailable: str | None


def _shorten(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _token_limit(tokenizer: Any, config: Any) -> int:
    """The smaller of the tokenizer's stated limit and the text tower's position table."""
    limits = [int(n) for n in (getattr(tokenizer, "model_max_length", None),
                               getattr(getattr(config, "text_config", None), "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else _FALLBACK_TOKEN_LIMIT


def _load_text_side(model: Any, family: str, source: str, model_name: str) -> _TextSide:
    """Load the tokenizer with the model. A model that cannot read text still serves image queries:
    the reason is kept and raised as NoTextTower by the first text query (and logged once now)."""
    from transformers import AutoTokenizer

    # A query is a few tokens: Rust-side parallel tokenising gains nothing, and once used it prints a
    # raw "process just got forked" notice to stderr at every later fork (the embedded PostgreSQL).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def unavailable(reason: str) -> _TextSide:
        log.warning("text_queries_unavailable", model=model_name, reason=reason)
        return _TextSide(None, 0, False, "", reason)

    if family == "jina":
        if not hasattr(model, "encode_text") or not hasattr(model, "get_tokenizer"):
            return unavailable(f"model '{model_name}' ({type(model).__name__}) has no text tower (no encode_text): "
                               "it cannot answer text queries")
        try:
            tokenizer = model.get_tokenizer()
        except (OSError, ValueError, ImportError) as exc:
            return unavailable(f"the tokenizer of model '{model_name}' cannot be loaded "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        get_instruction = getattr(getattr(model, "text_model", None), "get_instruction_from_task", None)
        instruction = (get_instruction(JINA_QUERY_TASK) or "") if callable(get_instruction) else ""
        return _TextSide(tokenizer, _token_limit(tokenizer, model.config), True, instruction, None)
    if not hasattr(model, "get_text_features"):
        return unavailable(f"model '{model_name}' ({type(model).__name__}) has no text tower "
                           "(no get_text_features): it cannot answer text queries")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        # TypeError: transformers' way of saying a slow tokenizer's files (vocab.json...) are missing.
        return unavailable(f"model '{model_name}' has no usable tokenizer, so it cannot read text queries "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); a model "
                           "directory needs its tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    # SigLIP was trained on text padded to its full length; CLIP pads to the longest query.
    padding: bool | str = "max_length" if getattr(model.config, "model_type", "") == "siglip" else True
    return _TextSide(tokenizer, _token_limit(tokenizer, model.config), padding, "", None)


# jina-clip-v2 pulls code and configuration from three more repositories while loading: an offline
# machine needs all four in its cache.
JINA_CLIP_V2_HUB_REPOS = ("jinaai/jina-clip-v2", "jinaai/jina-clip-implementation", "jinaai/jina-embeddings-v3",
                          "jinaai/xlm-roberta-flash-implementation")


def _hub_repos_to_download(model_name: str) -> tuple[str, ...]:
    """What ``huggingface-cli download`` must fetch for ``model_name`` to load offline."""
    return JINA_CLIP_V2_HUB_REPOS if model_name == JINA_CLIP_V2_HUB_REPOS[0] else (model_name,)
