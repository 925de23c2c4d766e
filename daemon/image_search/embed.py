"""Embedding: one model loaded once through transformers, images in, L2-normalised float32 vectors out.

Two families are supported through the same ``from_pretrained`` path and the same fast path:
- jina-clip-v2 (remote code, ``JinaCLIPModel``): ``get_image_features``, then the Matryoshka
  truncation, then L2 normalisation (what its ``encode_image`` does, without its per-image PIL loop);
- stock transformers CLIP and SigLIP: ``get_image_features``, then L2 normalisation.

One way in for pictures, ``embed_images``, whoever made them: the indexer's prepared pictures (from the
CPU workers or the GPU decoder), a query's, PIL images, or model-sized uint8 pixels. The fast path: the
model's processor is read from its ``preprocessor_config.json`` (``pixels.py``), pictures are resized
and cropped to the model's size in uint8 (by the worker processes or the GPU decoder, which put it in
``PreparedImage.pixels``, or here for a picture that comes without), and the uint8 batch is uploaded and
rescaled and normalised on the device. A processor that ``pixels.py`` does not mirror is used as it is
(slower, same results).
One way in for words, ``embed_texts``, the text queries' (the same model's text tower): jina-clip-v2's
``encode_text`` with its ``retrieval.query`` task; CLIP/SigLIP: the model's tokenizer, then
``get_text_features``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from .errors import DimensionError, ModelLoadError, NoTextTower, describe
from .eva_attention import patch_eva_attention
from .pixels import PixelSpec, PixelSpecError, load_pixel_spec, to_model_pixels
from .preprocess import PreparedImage

log = structlog.get_logger(__name__)

# What ``Embedder.embed_images`` takes, one per picture: a prepared picture (its ``pixels`` when it has
# them, else its ``image``), a PIL image, or the model's input at its size, (H, W, 3) uint8, as a numpy
# array or a tensor on any device.
Picture = PreparedImage | Image.Image | np.ndarray | torch.Tensor

# Images per forward pass on the CPU, and on CUDA until the probe at load has measured free memory.
DEFAULT_MAX_BATCH = 64


def choose_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU falls back to the CPU with a warning."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        log.warning("cuda_unavailable", detail="device 'cuda' was requested but no CUDA GPU is usable; using the CPU")
    return torch.device("cpu")


def _is_local(model_name: str) -> bool:
    """``model_name`` names a folder here. One behind a folder this user may not enter is a
    ``ModelLoadError`` (exit 3), not a crash (exit 1, which systemd restarts for ever)."""
    try:
        return Path(model_name).expanduser().is_dir()
    except RuntimeError:  # ~name of no user: no folder here
        return False
    except PermissionError as exc:
        raise ModelLoadError(f"model '{model_name}': this user may not reach it ({exc.strerror}): it needs search (x) "
                             "permission on every folder above it; under systemd, the unit's ProtectHome=yes "
                             "hides /home") from None


def _looks_like_path(model_name: str) -> bool:
    return model_name.startswith(("/", "./", "../", "~")) or model_name.count("/") > 1 or "\\" in model_name


def _unreadable_in(directory: Path) -> list[str]:
    """The files of a model directory this process's user may not read (the library reports such a file as
    missing: FileNotFoundError)."""
    effective = os.access in os.supports_effective_ids  # the user a service runs as, not who started it
    try:
        return sorted(p.name for p in directory.iterdir()  # a broken link is missing, not unreadable
                      if p.exists() and not os.access(p, os.R_OK, effective_ids=effective))
    except OSError:  # the directory itself cannot be listed: the library's error says as much
        return []


def _load_error(model_name: str, exc: BaseException) -> ModelLoadError:
    if (isinstance(exc, (FileNotFoundError, PermissionError)) and _is_local(model_name)
            and (unreadable := _unreadable_in(Path(model_name).expanduser()))):
        return ModelLoadError(
            f"model directory '{model_name}' cannot be loaded: this user (uid {os.geteuid()}) may not read "
            + ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
            + ". Give the service's user read access (chmod a+r, or chown) to the model's files."
        )
    if _is_local(model_name):
        return ModelLoadError(
            f"model directory '{model_name}' cannot be loaded ({describe(exc)}). "
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
        "(" + "; ".join(f"huggingface-cli download {repo}" for repo in _hub_repos_to_download(model_name))
        + ": one command per repository) and copy the cache "
        "(HF_HOME), or point 'model-name' at a local directory."
    )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "jina" or "clip" (stock transformers CLIP/SigLIP)
    native_dimension: int
    matryoshka_dimensions: tuple[int, ...]


class Embedder:
    """A model kept in memory on one device. Use ``Embedder.load``; then ``embed_images`` (pictures) and
    ``embed_texts`` (words) any number of times."""

    def __init__(self, model: Any, info: ModelInfo, device: torch.device, dtype: torch.dtype, dimension: int, *,
                 pixel_spec: PixelSpec | None, processor: Any = None, max_batch: int = DEFAULT_MAX_BATCH,
                 text_side: _TextSide | None = None) -> None:
        self._model = model
        self._text_side = text_side  # None only for an Embedder built by hand without its tokenizer
        self._processor = processor  # the model's own image processor: only where pixel_spec is None
        self._input = _ModelInput.build(device, dtype, pixel_spec, processor)
        self.pixel_spec = pixel_spec
        self.info = info
        self.device = device
        self.dtype = dtype
        self.dimension = dimension
        self.max_batch = max_batch  # images per forward pass: sized to free GPU memory at load, lowered after an OOM
        self._truncate = None if dimension == info.native_dimension else dimension

    @classmethod
    def load(cls, model_name: str, *, device: str = "auto", dimension: int | None = None,
             compile_model: bool = False) -> Embedder:
        """Load ``model_name`` (hub id or local directory) once; check it can produce ``dimension``.
        ``compile_model``: compile the vision tower's blocks now (``compiled.py``; config key 'compile-model')."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        from huggingface_hub.utils import logging as hub_logging

        hf_logging.set_verbosity_error()  # their warnings about unused weights are noise in our journal
        hub_logging.set_verbosity_error()  # one line per download retry, too; a failure ends in our own line
        torch_device = choose_device(device)
        source = str(Path(model_name).expanduser()) if _is_local(model_name) else model_name
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=True)
            dtype = choose_dtype(torch_device, "jina" if _is_jina_config(config) else "clip")
            model = AutoModel.from_pretrained(source, trust_remote_code=True, torch_dtype=dtype)
        except (OSError, ValueError, ImportError) as exc:
            raise _load_error(model_name, exc) from None
        model = model.to(torch_device).eval()
        if not hasattr(model, "get_image_features"):
            raise ModelLoadError(
                f"model '{model_name}' ({type(model).__name__}) has no get_image_features (as CLIP, SigLIP and "
                "jina-clip have): it is not an image-text embedding model"
            )
        if hasattr(model, "encode_image"):  # jina-clip; its encode_image (a per-image PIL loop) is never used
            family = "jina"
            matryoshka = tuple(int(d) for d in (getattr(config, "matryoshka_dimensions", None) or ()))
        else:
            family = "clip"
            matryoshka = ()
        patch_eva_attention(model)  # jina-clip's EVA tower without xformers; other models have no such module
        processor = None
        try:
            spec: PixelSpec | None = load_pixel_spec(source)
        except PixelSpecError as exc:
            spec = None
            log.warning("pixel_fast_path_unavailable", model=model_name, reason=str(exc),
                        detail="using the model's own image processor, on the main thread")
            try:
                processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
            except (OSError, ValueError, ImportError) as load_exc:
                raise _load_error(model_name, load_exc) from None
        model_input = _ModelInput.build(torch_device, dtype, spec, processor)
        if compile_model:
            _compile_vision_tower(model, model_input)
        # One tiny forward pass tells the true output size (and warms the model up).
        with torch.inference_mode():
            native = int(model.get_image_features(pixel_values=model_input.probe(1)).shape[1])
        max_batch = _batch_that_fits(model, model_input) if torch_device.type == "cuda" else DEFAULT_MAX_BATCH
        info = ModelInfo(model_name, family, native, matryoshka)
        checked = check_dimension(info, dimension if dimension is not None else native)
        embedder = cls(model, info, torch_device, dtype, checked, pixel_spec=spec, processor=processor,
                       max_batch=max_batch, text_side=_load_text_side(model, family, source, model_name))
        log.info("model_loaded", model=model_name, family=family, device=str(torch_device),
                 dtype=str(dtype).removeprefix("torch."), dimension=checked, native_dimension=native,
                 pixels="fast" if spec is not None else "model processor",
                 model_input=None if spec is None else f"{spec.output_size[0]}x{spec.output_size[1]}")
        return embedder

    def embed_images(self, pictures: Sequence[Picture] | np.ndarray | torch.Tensor) -> np.ndarray:
        """The one way in to the model for pictures: an (n, dimension) float32 array of unit vectors.

        ``pictures``: one ``Picture`` each (kinds may be mixed: the CPU workers' arrays and the GPU
        decoder's tensors in one batch), or an (n, height, width, 3) uint8 batch already at the model's
        size (``pixels.to_model_pixels``), as an array or a tensor on any device.

        Forward passes hold up to ``max_batch`` pictures, whatever ``n`` is. On a CUDA out-of-memory
        error the pass is split and the smaller size is kept for later passes, instead of dying.
        """
        if isinstance(pictures, (np.ndarray, torch.Tensor)):
            return self._embed_model_sized(pictures)
        if not pictures:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.pixel_spec is None:  # the model's own processor, on PIL images
            images = [_as_image(picture) for picture in pictures]
            return self._in_passes(len(images), lambda start, stop: self._input.from_images(images[start:stop]))
        spec = self.pixel_spec
        rows = [_model_sized(picture, spec) for picture in pictures]
        if all(isinstance(row, np.ndarray) for row in rows):
            return self._embed_model_sized(np.stack(rows))  # type: ignore[arg-type]
        # torch.tensor copies a worker's array (read-only: it came through a pipe) instead of aliasing it.
        return self._embed_model_sized(torch.stack([
            (row if isinstance(row, torch.Tensor) else torch.tensor(row)).to(self.device) for row in rows]))

    def _embed_model_sized(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """``embed_images`` of an (n, height, width, 3) uint8 batch at the model's size (array or tensor)."""
        if self.pixel_spec is None:
            raise RuntimeError(f"model '{self.info.name}' has an image processor pixels.py does not mirror: "
                               "give embed_images pictures (PIL images, prepared pictures), not model-sized pixels")
        width, height = self.pixel_spec.output_size
        if batch.dtype not in (np.uint8, torch.uint8) or batch.ndim != 4 or tuple(batch.shape[1:]) != (height, width, 3):
            raise ValueError(f"embed_images takes model-sized pixels as (n, {height}, {width}, 3) uint8 pictures, "
                             f"not {batch.dtype} {tuple(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if isinstance(batch, np.ndarray):
            batch = np.ascontiguousarray(batch)
        return self._in_passes(len(batch), lambda start, stop: self._input.from_pixels(batch[start:stop]))

    def _in_passes(self, count: int, model_input: Callable[[int, int], torch.Tensor]) -> np.ndarray:
        """Unit vectors for items [0, count): forward passes of at most ``max_batch`` items, whose input
        ``model_input(start, stop)`` builds on the device. The vectors stay on the device until the
        last pass, so uploads, passes and the single download queue up without waiting on each other."""
        outputs: list[torch.Tensor] = []
        start = 0
        with torch.inference_mode():
            while start < count:
                stop = min(count, start + self.max_batch)
                try:
                    outputs.append(self._forward(model_input(start, stop)))
                except torch.cuda.OutOfMemoryError:
                    if self.max_batch == 1:
                        raise
                    torch.cuda.empty_cache()
                    self.max_batch = max(1, (stop - start + 1) // 2)
                    log.warning("gpu_out_of_memory", action="smaller batches", batch_size=self.max_batch)
                    continue
                start = stop
            return torch.cat(outputs).cpu().numpy()

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One forward pass: (n, dimension) float32 unit vectors, on the device.

        Truncation comes before normalisation, as jina's encode_image does (Matryoshka prefixes are
        what was trained to stand alone).

        With config key 'compile-model' the vision tower's blocks run compiled (``compiled.py``); the
        code around them, this included, stays eager."""
        features = self._model.get_image_features(pixel_values=pixel_values)
        if self._truncate is not None:
            features = features[:, :self._truncate]
        return torch.nn.functional.normalize(features.float(), dim=-1)

    # --- text queries ------------------------------------------------------------------------------

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


def _model_sized(picture: Picture, spec: PixelSpec) -> np.ndarray | torch.Tensor:
    """A picture as the model's input, (H, W, 3) uint8 (checked with the rest of its batch)."""
    if isinstance(picture, PreparedImage):
        if picture.pixels is not None:
            return picture.pixels
        if picture.image is None:
            raise ValueError(f"prepared picture {picture.path} has neither pixels nor an image to embed")
        picture = picture.image
    if isinstance(picture, Image.Image):
        return to_model_pixels(picture, spec)
    return picture


def _as_image(picture: Picture) -> Image.Image:
    """A picture as a PIL image, for a model's own processor: a prepared picture's normalised pixels
    (``preprocess.normalised_pixels``: exactly the picture, not a JPEG round trip) or image."""
    if isinstance(picture, PreparedImage):
        picture = picture.image if picture.image is not None else picture.pixels
    if isinstance(picture, Image.Image):
        return picture
    if isinstance(picture, np.ndarray):
        return Image.fromarray(picture)
    raise TypeError(f"a model with its own image processor needs pictures on the host, not {type(picture).__name__}")


def _is_jina_config(config: Any) -> bool:
    return str(getattr(config, "model_type", "")).startswith("jina_clip")


def choose_dtype(device: torch.device, family: str) -> torch.dtype:
    """float32 on the CPU. On CUDA: bfloat16 for jina-clip where the GPU computes it natively, else float16.

    Why bfloat16 for jina-clip-v2: jina trained it in bfloat16 and publishes its weights in bfloat16;
    its own loader (JinaCLIPPreTrainedModel.from_pretrained) defaults to torch_dtype="auto", i.e. runs
    it in bfloat16. float16 would be a conversion jina never validated: 3 more mantissa bits, but a
    range that ends at 65504, where an EVA tower's activations are not known to stay. On Ampere and
    later (compute capability 8+) bfloat16 and float16 run at the same tensor-core rate, so the
    choice costs no speed there; before Ampere bfloat16 is emulated and float16 is the fast type.
    (Chosen from these facts, not measured: no GPU was lent when this was written.)
    CLIP and SigLIP stay in float16, as before: OpenAI's CLIP was trained with float16 mixed precision.
    """
    if device.type != "cuda":
        return torch.float32
    if family == "jina" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


@dataclass(frozen=True, eq=False)
class _ModelInput:
    """How pictures become the model's ``pixel_values`` on the device."""

    device: torch.device
    dtype: torch.dtype
    spec: PixelSpec | None
    processor: Any  # used only where spec is None
    mean: torch.Tensor | None  # (1, 3, 1, 1) float32 on the device, with spec
    std: torch.Tensor | None

    @classmethod
    def build(cls, device: torch.device, dtype: torch.dtype, spec: PixelSpec | None, processor: Any) -> _ModelInput:
        if spec is None and processor is None:
            raise ValueError("the model's input needs a PixelSpec or the model's own image processor")
        if spec is None:
            return cls(device, dtype, None, processor, None, None)
        mean = torch.tensor(spec.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        return cls(device, dtype, spec, processor, mean, std)

    def from_pixels(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> normalised (n, 3, H, W) in the model's dtype. The uint8 batch (a quarter
        of the float bytes) is what crosses to the GPU, from pinned memory, without blocking; rescale
        and normalisation run there, in float32 as the processors compute them. A tensor already on
        the device (decoded there) does not move."""
        assert self.spec is not None and self.mean is not None and self.std is not None
        if isinstance(batch, np.ndarray):
            uint8 = torch.from_numpy(batch)
            if self.device.type == "cuda":
                uint8 = uint8.pin_memory().to(self.device, non_blocking=True)
        else:
            uint8 = batch.to(self.device)  # no copy when it is there already ("cuda" and "cuda:0" alike)
        pixels = uint8.permute(0, 3, 1, 2).to(torch.float32)
        return ((pixels * self.spec.rescale - self.mean) / self.std).to(self.dtype).contiguous()

    def from_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.spec is not None:
            spec = self.spec
            return self.from_pixels(np.stack([to_model_pixels(image, spec) for image in images]))
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def probe(self, count: int) -> torch.Tensor:
        """``count`` mid-grey pictures as model input (for the output size and the memory probe)."""
        if self.spec is not None:
            width, height = self.spec.output_size
            return self.from_pixels(np.full((count, height, width, 3), 127, dtype=np.uint8))
        return self.from_images([Image.new("RGB", (512, 512), (127, 127, 127))] * count)


def _compile_vision_tower(model: Any, model_input: _ModelInput) -> None:
    from .compiled import compile_blocks, vision_blocks

    blocks = vision_blocks(model)
    if blocks is None:
        log.warning("model_compile_skipped", reason="the model has no vision_model with repeated blocks",
                    detail="the model runs without torch.compile")
        return

    def forward(size: int) -> None:
        with torch.inference_mode():
            model.get_image_features(pixel_values=model_input.probe(size))

    compile_blocks(blocks, forward)


def _batch_that_fits(model: Any, model_input: _ModelInput, probe: int = 4, ceiling: int = 256) -> int:
    """CUDA only: measure what one image of a forward pass costs and size passes to about 70% of the
    free memory (the out-of-memory backoff in ``Embedder._in_passes`` remains the safety net)."""
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model.get_image_features(pixel_values=model_input.probe(probe))
        torch.cuda.synchronize()
        per_image = max(1, (torch.cuda.max_memory_allocated() - before) // probe)
        free, _ = torch.cuda.mem_get_info()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        log.warning("gpu_batch_probe_failed", reason=str(exc), batch_size=DEFAULT_MAX_BATCH)
        return DEFAULT_MAX_BATCH
    fits = int(max(1, min(ceiling, 0.7 * free // per_image)))
    log.info("gpu_batch_size", batch_size=fits, per_image_mb=round(per_image / 2**20, 1), free_mb=round(free / 2**20))
    return fits


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
                               f"({describe(exc)})")
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
                           f"({describe(exc)}); a model "
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
