"""Shared fixtures: a tiny CLIP model saved to disk (no network) and config files in temp trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_DIMENSION = 32
# The tiny tokenizer's vocabulary: 256 byte symbols, the same 256 word-final, 4 merges, then these two.
_TINY_MERGES = (("a", "b"), ("c", "a"), ("r", "e"), ("re", "d</w>"))
TINY_BOS_ID = 2 * 256 + len(_TINY_MERGES)
TINY_EOS_ID = TINY_BOS_ID + 1


def save_tiny_clip(directory: Path, *, projection_dim: int = TINY_DIMENSION, image_size: int = 32, seed: int = 0,
                   with_tokenizer: bool = True) -> Path:
    """A randomly initialised CLIP with tiny towers, saved like any checkpoint (config, weights, image
    processor and, unless ``with_tokenizer`` is False, a tiny tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 77,
                     # the tiny tokenizer's ids: CLIP pools the text at the first end-of-text token
                     "bos_token_id": TINY_BOS_ID, "eos_token_id": TINY_EOS_ID, "pad_token_id": TINY_EOS_ID},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    if with_tokenizer:
        save_tiny_clip_tokenizer(Path(directory), max_tokens=config.text_config.max_position_embeddings)
    return directory


def save_tiny_clip_tokenizer(directory: Path, *, max_tokens: int = 77) -> None:
    """A real CLIP byte-level BPE tokenizer with a tiny vocabulary written here (no download): every byte
    is a token, on its own and word-final (``</w>``), plus a few merges, so any text, Japanese included,
    tokenizes to ids below the tiny model's vocab_size. Saved slow and fast, as hub checkpoints are."""
    import json as _json

    from transformers import CLIPTokenizer, CLIPTokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = _TINY_MERGES
    vocab = {token: i for i, token in enumerate(
        [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"])}
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (TINY_BOS_ID, TINY_EOS_ID)
    (directory / "vocab.json").write_text(_json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    slow = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_tokens)
    slow.save_pretrained(directory)
    CLIPTokenizerFast.from_pretrained(directory).save_pretrained(directory)  # adds tokenizer.json


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def save_picture(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A distinct picture per seed: blocks of random colours (not noise, so JPEG keeps it recognisable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def write_config(root: Path, model_dir: Path | None = None, **overrides: object) -> Path:
    """A config for a tree under ``root`` (images/, inbox/, output/, processed/, state/); keys as in JSON."""
    for name in ("images", "inbox", "output", "processed", "state"):
        (root / name).mkdir(parents=True, exist_ok=True)
    cfg: dict[str, object] = {
        "source-directory": str(root / "images"),
        "inbox-directory": str(root / "inbox"),
        "output-directory": str(root / "output"),
        "processed-directory": str(root / "processed"),
        "state-directory": str(root / "state"),
        "device": "cpu",
        "dimension": TINY_DIMENSION,
        "resize-width": 256,
        "resize-height": 256,
        "batch-size": 8,
        "settle-seconds": 0.3,
    }
    if model_dir is not None:
        cfg["model-name"] = str(model_dir)
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    path = root / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path
