"""Shapes world: deterministic bytes, split sizes, one right answer per test caption, captions that say
what the picture shows."""

import json

import numpy as np
import pytest
from data_helpers import data_config

from pipeline.config import DemoConfig
from pipeline.data.canonical import prepare_dataset
from pipeline.data.images import load_rgb
from stages.demo import shapes


def small_config(out_dir, **overrides) -> DemoConfig:
    settings = {"out_dir": str(out_dir), "n_train": 24, "n_val": 12, "n_test": 40, "seed": 3}
    settings.update(overrides)
    return DemoConfig(**settings)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    path = shapes.generate_shapes(small_config(out))
    return path, json.loads(path.read_text())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, generated):
    first_path, _ = generated
    second_path = shapes.generate_shapes(small_config(tmp_path / "again"))
    assert second_path.name == "dataset_shapes.json"
    assert second_path.read_bytes() == first_path.read_bytes()
    first_images = sorted((first_path.parent / "images").iterdir())
    second_images = sorted((second_path.parent / "images").iterdir())
    assert [p.name for p in first_images] == [p.name for p in second_images]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first_images, second_images, strict=True))
    other = shapes.generate_shapes(small_config(tmp_path / "other", seed=4))
    assert other.read_bytes() != first_path.read_bytes()


def test_split_sizes_and_karpathy_layout(generated):
    path, document = generated
    images = document["images"]
    assert [e["split"] for e in images] == ["train"] * 24 + ["val"] * 12 + ["test"] * 40
    assert len(list((path.parent / "images").glob("*.png"))) == 76
    sentence_ids = [s["sentid"] for e in images for s in e["sentences"]]
    assert sentence_ids == list(range(76 * 5))
    for number, entry in enumerate(images):
        assert entry["imgid"] == number and entry["filename"] == f"{number:06d}.png"
        assert len(entry["sentences"]) == 5 and len({s["raw"] for s in entry["sentences"]}) == 5
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for sentence in entry["sentences"]:
            assert sentence["imgid"] == number and sentence["tokens"] and sentence["raw"] == sentence["raw"].strip()


def test_images_are_rgb_of_the_configured_size(generated):
    path, document = generated
    image = load_rgb(path.parent / "images" / document["images"][0]["filename"])
    assert image.size == (64, 64)


def test_test_and_val_descriptions_are_distinct_at_full_size():
    for split, n in (("test", 1000), ("val", 500)):
        scenes = shapes._split_scenes(np.random.default_rng([0, shapes.SPLIT_CODES[split]]), n, True, split)
        assert len({s.description() for s in scenes}) == n
        assert {s.kind for s in scenes} == set(shapes.KINDS)


def words_for(table: dict, key: str, index: int | None = None) -> list[str]:
    options = table[key]
    return [o[index] if index is not None else o for o in options]


def mentions(caption: str, phrases: list[str]) -> bool:
    padded = f" {caption.replace(',', ' ').replace(':', ' ')} "
    return any(f" {p} " in padded for p in phrases)


def test_captions_mention_exactly_the_scene_attributes(generated):
    _, document = generated
    all_colours = {w for words in shapes.COLOUR_WORDS.values() for w in words}
    for entry in document["images"]:
        scene = entry["scene"]
        colours_in_scene = set()
        for caption in (s["raw"] for s in entry["sentences"]):
            for obj in scene["objects"]:
                colours = list(shapes.COLOUR_WORDS[obj["colour"]])
                colours_in_scene.update(colours)
                assert mentions(caption, colours), (caption, obj)
                plural = scene["kind"] == "count"
                assert mentions(caption, words_for(shapes.SHAPE_WORDS, obj["shape"], 1 if plural else 0)), caption
            if scene["kind"] in ("single", "count"):
                assert mentions(caption, list(shapes.SIZE_WORDS[scene["objects"][0]["size"]])), caption
            if scene["kind"] == "single":
                assert mentions(caption, list(shapes.POSITION_WORDS[scene["position"]])), caption
            if scene["kind"] == "count":
                assert mentions(caption, list(shapes.COUNT_WORDS[len(scene["objects"])])), caption
            other_colours = all_colours - colours_in_scene
            assert not any(mentions(caption, [c]) for c in other_colours), caption


def nearest_colour(pixel) -> str:
    distances = {name: np.abs(np.asarray(rgb) - pixel).sum() for name, rgb in shapes.COLOURS.items()}
    return min(distances, key=distances.get)


def test_pictures_show_the_described_objects(generated):
    path, document = generated
    for entry in document["images"]:
        pixels = np.asarray(load_rgb(path.parent / "images" / entry["filename"]), dtype=float)
        for obj in entry["scene"]["objects"]:
            x, y = int(obj["x"] * 64), int(obj["y"] * 64)
            # The centre of every shape is inside it; a 3x3 mean smooths the background noise.
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            assert nearest_colour(patch) == obj["colour"], (entry["filename"], obj)


def test_layout_agrees_with_the_words(generated):
    _, document = generated
    for entry in document["images"]:
        scene = entry["scene"]
        objects = scene["objects"]
        if scene["kind"] == "relation":
            first, second = objects
            if scene["relation"] == "left_of":
                assert second["x"] - first["x"] > 0.2 and abs(second["y"] - first["y"]) < 0.15
            else:
                assert second["y"] - first["y"] > 0.2 and abs(second["x"] - first["x"]) < 0.15
        if scene["kind"] == "single":
            x, y = objects[0]["x"], objects[0]["y"]
            expected = {
                "left": x < 0.3,
                "right": x > 0.7,
                "top": y < 0.3,
                "bottom": y > 0.7,
                "centre": abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1,
            }
            assert expected[scene["position"]], scene
        for i, a in enumerate(objects):
            for b in objects[:i]:
                assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["radius"] + b["radius"], "overlap"


def test_stale_images_of_a_bigger_run_are_removed(tmp_path):
    shapes.generate_shapes(small_config(tmp_path, n_train=10, n_val=0, n_test=5))
    shapes.generate_shapes(small_config(tmp_path, n_train=4, n_val=0, n_test=2))
    assert len(list((tmp_path / "images").glob("*.png"))) == 6


def test_generated_dataset_prepares_cleanly(tmp_path, generated):
    path, _ = generated
    ds = prepare_dataset(data_config(tmp_path, path, root=path.parent / "images"))
    assert (ds.num_images, ds.num_captions) == (76, 380)
    assert len(ds.image_ids("test")) == 40 and ds.dropped == []


def test_impossible_requests_fail_clearly(tmp_path):
    from pipeline.errors import DsmdError

    # Two small red squares can be worded 6 (templates) x 2 (two/2) x 3 (small/little/tiny) = 36 ways.
    square = shapes.ShapeObject("square", "red", "small", 0.3, 0.3, 0.09, 0.0, (215, 35, 35))
    scene = shapes.Scene("count", (square, square))
    assert len(shapes.scene_captions(scene, 36, np.random.default_rng(0))) == 36
    with pytest.raises(DsmdError, match="captions_per_image"):
        shapes.scene_captions(scene, 37, np.random.default_rng(0))
    with pytest.raises(DsmdError, match="n_test"):
        shapes._split_scenes(np.random.default_rng(0), shapes.description_space() // 2 + 1, True, "test")
    assert shapes.description_space() == 400 + 160 + 3120 + 9880


def _pixels(path) -> bytes:
    return np.asarray(load_rgb(path)).tobytes()


def test_pretrain_corpus_is_repeatable_and_shares_no_image_with_the_splits(tmp_path, generated):
    path, document = generated
    settings = {"pretrain_dir": str(tmp_path / "pretrain"), "n_pretrain": 150}
    corpus_path = shapes.generate_pretrain_corpus(small_config(path.parent, **settings))
    corpus = json.loads(corpus_path.read_text())
    assert corpus_path.name == shapes.PRETRAIN_FILE and len(corpus["images"]) == 150
    assert {e["split"] for e in corpus["images"]} == {"train"}
    assert [e["filename"] for e in corpus["images"]] == [f"p{i:06d}.png" for i in range(150)]
    # The split dataset is untouched by the corpus, and the corpus is the same bytes on a rerun.
    assert path.read_bytes() == shapes.generate_shapes(small_config(tmp_path / "again")).read_bytes()
    again = shapes.generate_pretrain_corpus(small_config(path.parent, pretrain_dir=str(tmp_path / "p2"),
                                                         n_pretrain=150))
    assert again.read_bytes() == corpus_path.read_bytes()

    # Compared by decoded pixels, so a re-encoding could not hide a shared picture.
    split_pixels = {_pixels(path.parent / "images" / e["filename"]) for e in document["images"]}
    corpus_pixels = [_pixels(corpus_path.parent / "images" / e["filename"]) for e in corpus["images"]]
    assert len(split_pixels) == len(document["images"])
    assert not split_pixels & set(corpus_pixels)
    assert len(set(corpus_pixels)) == 150
    # The corpus is the same world: its scenes are of the same kinds, and a description may recur.
    assert {e["scene"]["kind"] for e in corpus["images"]} == set(shapes.KINDS)


def test_pretrain_corpus_prepares_cleanly_and_a_smaller_one_replaces_it(tmp_path):
    corpus_path = shapes.generate_pretrain_corpus(small_config(tmp_path, pretrain_dir=str(tmp_path / "p"),
                                                               n_pretrain=8))
    ds = prepare_dataset(data_config(tmp_path / "c", corpus_path, root=corpus_path.parent / "images"))
    assert (ds.num_images, ds.num_captions, len(ds.image_ids("train"))) == (8, 40, 8)
    # A smaller corpus afterwards leaves no stale picture behind.
    shapes.generate_pretrain_corpus(small_config(tmp_path, pretrain_dir=str(tmp_path / "p"), n_pretrain=3))
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 3
    empty = shapes.generate_pretrain_corpus(small_config(tmp_path, pretrain_dir=str(tmp_path / "p"), n_pretrain=0))
    assert json.loads(empty.read_text())["images"] == []
    assert not list((tmp_path / "p" / "images").glob("*.png"))
