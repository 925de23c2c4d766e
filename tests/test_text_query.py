"""Text queries: reading the words from a dropped file, and embedding them with the model's text tower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import structlog

from tests.support.model import TINY_DIMENSION, save_tiny_clip
from image_search.embed import Embedder, NoTextTower
from image_search.errors import UnusableFile
from image_search.preprocess import PreprocessError
from image_search.textquery import MAX_TEXT_QUERY_BYTES, TextQueryError, is_text_query, read_text_query

pytestmark = pytest.mark.integration

# --- reading the file ---------------------------------------------------------------------------------


def write(tmp_path: Path, data: bytes, name: str = "query.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path) -> TextQueryError:
    with pytest.raises(TextQueryError) as caught:
        read_text_query(path)
    assert caught.value.path == path
    return caught.value


def test_the_whole_text_is_the_query_trimmed(tmp_path: Path) -> None:
    path = write(tmp_path, "\n  a red bicycle\nleaning on a wall \t\n\n".encode())
    assert read_text_query(path) == "a red bicycle\nleaning on a wall"


def test_japanese_and_a_byte_order_mark(tmp_path: Path) -> None:
    assert read_text_query(write(tmp_path, "\ufeff赤い自転車\n".encode())) == "赤い自転車"


def test_an_empty_file_is_refused_as_empty(tmp_path: Path) -> None:
    assert refused(write(tmp_path, b"")).reason.startswith("empty file (0 bytes)")


def test_a_whitespace_only_file_is_refused(tmp_path: Path) -> None:
    reason = refused(write(tmp_path, " \n\t\r\n\u3000 ".encode())).reason
    assert "empty" in reason and "only whitespace (9 bytes)" in reason
    assert refused(write(tmp_path, b"\n", "one.txt")).reason.endswith("only whitespace (1 byte)")


def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path: Path) -> None:
    reason = refused(write(tmp_path, "vélo rouge".encode("latin-1"))).reason
    assert reason.startswith("not UTF-8 text") and "0xe9 at offset 1" in reason


def test_utf16_is_named(tmp_path: Path) -> None:
    assert "UTF-16" in refused(write(tmp_path, "a red bicycle".encode("utf-16"))).reason


def test_a_file_larger_than_64_kib_is_refused_with_its_size(tmp_path: Path) -> None:
    path = write(tmp_path, b"bicycle " * (MAX_TEXT_QUERY_BYTES // 8) + b"!")
    reason = refused(path).reason
    assert "too large" in reason and f"{MAX_TEXT_QUERY_BYTES + 1:,} bytes" in reason and "64 KiB" in reason
    exactly = write(tmp_path, b"a" * MAX_TEXT_QUERY_BYTES, "edge.txt")  # at the limit is fine
    assert len(read_text_query(exactly)) == MAX_TEXT_QUERY_BYTES


def test_binary_content_and_missing_files(tmp_path: Path) -> None:
    assert "NUL" in refused(write(tmp_path, b"abc\x00def")).reason
    assert "disappeared" in refused(tmp_path / "gone.txt").reason
    (tmp_path / "folder.txt").mkdir()
    assert "folder" in refused(tmp_path / "folder.txt").reason


def test_a_text_query_error_is_an_unusable_file_not_a_pictures_error_and_txt_is_a_text_query(tmp_path: Path) -> None:
    with pytest.raises(UnusableFile) as empty:
        read_text_query(write(tmp_path, b""))
    assert not isinstance(empty.value, PreprocessError)  # a text query is no picture
    assert empty.value.still_arriving  # an empty query file waits, as a picture still being written does
    assert not refused(write(tmp_path, b"   ", "blank.txt")).still_arriving  # only whitespace: really empty
    assert is_text_query(Path("q.TXT")) and not is_text_query(Path("q.jpg"))


# --- embedding the words --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> Embedder:
    return Embedder.load(str(tiny_model_dir), device="cpu", dimension=TINY_DIMENSION)


def test_texts_become_unit_float32_vectors_of_the_index_dimension(embedder: Embedder) -> None:
    texts = ["a red bicycle", "赤い自転車", "a cat on a sofa", "x"]
    vectors = embedder.embed_texts(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), TINY_DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([embedder.embed_texts([t]) for t in texts])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)  # padding in a batch changes nothing
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # different words, different vectors
    assert embedder.embed_texts([]).shape == (0, TINY_DIMENSION)


def test_text_vectors_are_the_models_own_text_features(embedder: Embedder, tiny_model_dir: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPTokenizerFast

    model = CLIPModel.from_pretrained(tiny_model_dir).eval()
    tokens = CLIPTokenizerFast.from_pretrained(tiny_model_dir)(["a red bicycle"], return_tensors="pt")
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.get_text_features(**tokens), dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed_texts(["a red bicycle"]), reference, atol=1e-5)


def test_a_query_longer_than_the_model_reads_is_truncated_with_one_warning(embedder: Embedder,
                                                                          tiny_model_dir: Path) -> None:
    limit = embedder.text_token_limit
    assert limit == 77
    long_query = "bicycle " * 200
    with structlog.testing.capture_logs() as logs:
        vector = embedder.embed_texts([long_query])
        embedder.embed_texts(["a red bicycle"])  # a short one says nothing
    warnings = [entry for entry in logs if entry["event"] == "text_query_truncated"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning" and warnings[0]["limit"] == 77 and warnings[0]["tokens"] > 77
    # what the model saw is exactly the first 77 tokens
    np.testing.assert_allclose(vector, embedder.embed_texts(["bicycle " * 200 + "and much more"]), atol=1e-5)
    np.testing.assert_allclose(vector, text_features(tiny_model_dir, long_query, 77), atol=1e-5)
    assert not np.allclose(vector, text_features(tiny_model_dir, long_query, 76), atol=1e-3)  # not 76


def text_features(model_dir: Path, text: str, tokens: int) -> np.ndarray:
    """The tiny CLIP's own unit text vector of ``text`` cut to its first ``tokens`` tokens (end token included)."""
    import torch
    from transformers import CLIPModel, CLIPTokenizerFast

    model = CLIPModel.from_pretrained(model_dir).eval()
    ids = CLIPTokenizerFast.from_pretrained(model_dir)([text], truncation=True, max_length=tokens, return_tensors="pt")
    assert ids["input_ids"].shape == (1, tokens)
    with torch.inference_mode():
        return torch.nn.functional.normalize(model.get_text_features(**ids), dim=-1).numpy()


def test_a_model_without_a_tokenizer_cannot_answer_text_but_still_serves_images(tmp_path: Path) -> None:
    model_dir = save_tiny_clip(tmp_path / "no-tokenizer", with_tokenizer=False)
    with structlog.testing.capture_logs() as logs:
        embedder = Embedder.load(str(model_dir), device="cpu", dimension=TINY_DIMENSION)
    assert [entry["event"] for entry in logs].count("text_queries_unavailable") == 1
    from PIL import Image

    assert embedder.embed_images([Image.new("RGB", (40, 30), (200, 10, 10))]).shape == (1, TINY_DIMENSION)
    with pytest.raises(NoTextTower, match="no-tokenizer.*tokenizer files"):
        embedder.embed_texts(["a red bicycle"])


def test_a_model_with_no_text_tower_is_a_typed_error(embedder: Embedder, monkeypatch) -> None:
    from image_search import embed as embed_module

    class ImageOnly:  # what an image-only checkpoint class offers: image features, no text features
        config = None

        def get_image_features(self, pixel_values):  # pragma: no cover - never called here
            raise AssertionError

    side = embed_module._load_text_side(ImageOnly(), "clip", "unused", "org/image-only")
    monkeypatch.setattr(embedder, "_text_side", side)
    with pytest.raises(NoTextTower, match="'org/image-only'.*has no text tower"):
        embedder.embed_texts(["a red bicycle"])


class _JinaLike:
    """The surface of jina-clip-v2's remote code that text queries use (its real signature:
    ``encode_text(sentences, task=None, batch_size=32, ..., normalize_embeddings=True,
    truncate_dim=None, **tokenizer_kwargs)``), returning fixed, deliberately unnormalised vectors."""

    NATIVE = 64

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.config = type("Config", (), {"text_config": None})()
        self.text_model = type("TextModel", (), {"get_instruction_from_task": staticmethod(
            lambda task: "Represent the query for retrieving evidence documents: " if task == "retrieval.query" else None)})()
        self.calls: list[dict] = []

    def get_tokenizer(self):
        return self.tokenizer

    def encode_text(self, sentences, task=None, batch_size=32, convert_to_numpy=True, convert_to_tensor=False,
                    normalize_embeddings=True, truncate_dim=None, **tokenizer_kwargs):
        import torch

        # What jina's encode_text reads: its task's instruction before each sentence, cut at max_length
        # tokens (512 unless told otherwise).
        instruction = self.text_model.get_instruction_from_task(task) or ""
        read = self.tokenizer([instruction + s for s in sentences], truncation=True,
                              max_length=tokenizer_kwargs.get("max_length", 512))["input_ids"]
        self.calls.append({"task": task, "truncate_dim": truncate_dim, "normalize": normalize_embeddings,
                           "tensor": convert_to_tensor, "read": read, **tokenizer_kwargs})
        rows = [np.arange(1, self.NATIVE + 1, dtype=np.float32) * (len(s) + 1) for s in sentences]
        out = torch.from_numpy(np.stack(rows))
        return out[:, :truncate_dim] if truncate_dim else out


def test_jina_queries_use_the_retrieval_query_task_and_the_matryoshka_prefix(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from image_search import embed as embed_module
    from image_search.embed import ModelInfo
    from image_search.pixels import PixelSpec
    from tests.support.jina import JINA_CLIP_V2_PREPROCESSOR_CONFIG

    model = _JinaLike(AutoTokenizer.from_pretrained(tiny_model_dir))
    embedder = Embedder(model, ModelInfo("jinaai/jina-clip-v2", "jina", 64, (16, 32, 64)), torch.device("cpu"),
                        torch.float32, dimension=16,
                        pixel_spec=PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG),
                        text_side=embed_module._load_text_side(model, "jina", "unused", "jinaai/jina-clip-v2"))
    vectors = embedder.embed_texts(["a red bicycle", "赤い自転車"])
    (call,) = model.calls
    assert call["task"] == "retrieval.query" and call["truncate_dim"] == 16 and call["normalize"] is False
    assert call["max_length"] == embedder.text_token_limit and call["tensor"] is True
    expected = np.arange(1, 17, dtype=np.float32)
    np.testing.assert_allclose(vectors, np.stack([expected / np.linalg.norm(expected)] * 2), atol=1e-6)
    # the instruction jina prepends counts towards the limit: a query that fits alone may not with it
    assert embedder._text_side.instruction.startswith("Represent the query")


def test_a_jina_query_is_cut_at_the_token_limit_counting_jinas_instruction(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from image_search import embed as embed_module
    from image_search.embed import ModelInfo
    from image_search.pixels import PixelSpec
    from tests.support.jina import JINA_CLIP_V2_PREPROCESSOR_CONFIG

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _JinaLike(tokenizer)
    embedder = Embedder(model, ModelInfo("jinaai/jina-clip-v2", "jina", 64, (16, 32, 64)), torch.device("cpu"),
                        torch.float32, dimension=16,
                        pixel_spec=PixelSpec.from_processor_config(JINA_CLIP_V2_PREPROCESSOR_CONFIG),
                        text_side=embed_module._load_text_side(model, "jina", "unused", "jinaai/jina-clip-v2"))
    limit = embedder.text_token_limit
    instruction = embedder._text_side.instruction
    fits_alone = "bicycle " * 5  # 37 tokens alone; with the instruction's 47 more than the 77 read
    assert len(tokenizer(fits_alone)["input_ids"]) < limit < len(tokenizer(instruction + fits_alone)["input_ids"])
    long_query = "bicycle " * 100
    with structlog.testing.capture_logs() as logs:
        embedder.embed_texts([fits_alone])
        embedder.embed_texts([long_query])
        embedder.embed_texts(["a red bicycle"])
    warned = [(e["tokens"], e["limit"]) for e in logs if e["event"] == "text_query_truncated"]
    assert warned == [(len(tokenizer(instruction + fits_alone)["input_ids"]), limit),
                      (len(tokenizer(instruction + long_query)["input_ids"]), limit)]
    # jina was asked to cut at the limit, not at its own default of 512: it read exactly `limit` tokens,
    # the instruction's first.
    read = [call["read"][0] for call in model.calls]
    assert [len(r) for r in read[:2]] == [limit, limit] and len(read[2]) < limit
    with_instruction = tokenizer(instruction)["input_ids"][:-1]  # without its end token
    assert all(r[:len(with_instruction)] == with_instruction for r in read)


def test_the_offline_advice_for_jina_clip_v2_names_all_four_hub_repositories(tmp_path: Path) -> None:
    """In a fresh interpreter whose Hugging Face cache is empty (HF_HOME is read when huggingface_hub is
    first imported, so it cannot be changed in this one, where an earlier test may have imported it)."""
    import json
    import subprocess
    import sys

    from image_search.embed import JINA_CLIP_V2_HUB_REPOS
    from tests.support.env import child_env

    program = (
        "import json\n"
        "from image_search.embed import Embedder, ModelLoadError\n"
        "try:\n"
        "    Embedder.load('jinaai/jina-clip-v2', device='cpu')\n"
        "except ModelLoadError as exc:\n"
        "    print(json.dumps(str(exc)))\n"
    )
    env = {k: v for k, v in child_env(HF_HOME=str(tmp_path / "empty-cache")).items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")}
    assert env["HF_HUB_OFFLINE"] == "1"
    run = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip(), run.stdout + run.stderr[-3000:]
    message = json.loads(run.stdout.strip().splitlines()[-1])
    assert "HF_HUB_OFFLINE" in message
    # One command per repository: `huggingface-cli download A B C` reads B and C as file names inside A.
    assert "; ".join(f"huggingface-cli download {repo}" for repo in JINA_CLIP_V2_HUB_REPOS) in message
    assert len(JINA_CLIP_V2_HUB_REPOS) == 4 and "\n" not in message
    assert not any((tmp_path / "empty-cache").rglob("config.json"))  # nothing came from anywhere but this cache
