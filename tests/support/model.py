"""The tiny random CLIP the tests and the benchmark load through the real ``from_pretrained`` path."""

from __future__ import annotations

from pathlib import Path

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
