"""The perceptual hash: one picture saved again in the ways people do is within the near-copy distance of
its original, as ingest hashes it (``preprocess_image``); a burst of the same scene and distinct
pictures are not."""

from __future__ import annotations

import io
import itertools

import pytest
from PIL import Image

from image_search import phash
from image_search.preprocess import preprocess_image
from tests.support.derived import DERIVATIONS, burst, save_derived, scene

BOX = (1024, 1024)
LIMIT = 178_956_970
SIZE = (640, 480)


def ingest_hash(path) -> int:
    prepared = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    assert prepared.phash is not None
    return prepared.phash


@pytest.fixture(scope="module")
def saved_again(tmp_path_factory):
    """Two scenes, each saved in every way of ``DERIVATIONS``: {seed: {derivation: hash at ingest}}."""
    folder = tmp_path_factory.mktemp("derived")
    return {seed: {name: ingest_hash(path) for name, path in save_derived(folder, f"scene{seed}", scene(seed, SIZE)).items()}
            for seed in (1, 2)}


@pytest.mark.parametrize("derivation", [name for name in DERIVATIONS if name != "original"])
def test_a_picture_saved_again_is_a_near_copy_of_its_original(saved_again, derivation):
    for hashes in saved_again.values():
        assert phash.distance(hashes["original"], hashes[derivation]) <= phash.NEAR_COPY_MAX_DISTANCE


def test_a_turned_file_hashes_as_its_upright_twin_and_not_as_its_raw_pixels(tmp_path, saved_again):
    raw = scene(1, SIZE).transpose(Image.Transpose.ROTATE_270)  # the turned file's pixels, orientation ignored
    assert phash.distance(saved_again[1]["turned"], phash.perceptual_hash(raw)) > 3 * phash.NEAR_COPY_MAX_DISTANCE


def test_distinct_pictures_are_far_apart(saved_again):
    originals = [hashes["original"] for hashes in saved_again.values()] + [
        phash.perceptual_hash(scene(seed, SIZE)) for seed in range(3, 9)]
    for a, b in itertools.combinations(originals, 2):
        assert phash.distance(a, b) > 5 * phash.NEAR_COPY_MAX_DISTANCE


def test_a_burst_is_not_a_near_copy():
    """Shots of one scene whose camera moved by 1-3 % of the frame: ``similar``, never ``near-copy``."""
    for seed in range(4):
        first = phash.perceptual_hash(burst(seed, 0, SIZE))
        for shot in (1, 2, 3):
            assert phash.distance(first, phash.perceptual_hash(burst(seed, shot, SIZE))) > phash.NEAR_COPY_MAX_DISTANCE


def test_the_stored_thumbnail_hashes_as_ingest_did(tmp_path):
    """What fills a row's hash later (its thumbnail file) agrees with what ingest computed."""
    path = save_derived(tmp_path, "scene", scene(5, SIZE), ("original",))["original"]
    prepared = preprocess_image(path, max_size=BOX, max_pixels=LIMIT)
    with Image.open(io.BytesIO(prepared.thumbnail_jpeg)) as thumbnail:
        assert phash.distance(prepared.phash, phash.perceptual_hash(thumbnail)) <= 4


def test_hashes_round_trip_through_their_stored_bytes_and_words():
    values = [phash.perceptual_hash(scene(seed, (160, 120))) for seed in range(3)]
    assert [phash.from_bytes(phash.to_bytes(v)) for v in values] == values
    assert all(len(phash.to_bytes(v)) == phash.HASH_BYTES for v in values)
    words = phash.as_words(values)
    for v in values:
        assert list(phash.distances(words, phash.as_words([v])[0])) == [phash.distance(v, w) for w in values]
