"""caption_warnings (hashes and sorting, for flat memory) against the plain dict-based rule it replaced."""

import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.canonical import CanonicalDataset
from pipeline.data.check import CaptionWarning, caption_warnings
from pipeline.data.rows import SPLITS

LONG_WORDS = 3


def reference(texts: list[str], owners: list[int], splits: list[str]) -> list[CaptionWarning]:
    warnings, first, by_text = [], {}, defaultdict(list)
    for caption_id, (text, image_id, split) in enumerate(zip(texts, owners, splits, strict=True)):
        key = re.sub(r"\s+", " ", text).strip().lower()
        if (image_id, key) in first:
            detail = f"same text as caption {first[(image_id, key)]}"
            warnings.append(CaptionWarning(caption_id, image_id, "duplicate_in_image", detail))
        else:
            first[(image_id, key)] = caption_id
            by_text[(split, key)].append(caption_id)
        if len(text.split()) > LONG_WORDS:
            detail = f"{len(text.split())} words; teachers truncate long captions"
            warnings.append(CaptionWarning(caption_id, image_id, "long", detail))
    for (split, _), ids in by_text.items():
        if split != "train" and len(ids) > 1:
            images = [owners[c] for c in ids]
            shown = ", ".join(map(str, images[:5])) + (", ..." if len(images) > 5 else "")
            detail = f"same text on {len(images)} {split} images (ids {shown})"
            warnings.append(CaptionWarning(ids[0], images[0], "shared_across_images", detail))
    return sorted(warnings, key=lambda w: (w.caption_id, w.kind))


def dataset(texts: list[str], owners: list[int], image_splits: list[str]) -> CanonicalDataset:
    n = len(image_splits)
    images = pa.table({"image_id": np.arange(n), "key": [str(i) for i in range(n)],
                       "path": [f"{i}.jpg" for i in range(n)], "split": image_splits})
    captions = pa.table({"caption_id": np.arange(len(texts)), "image_id": pa.array(owners, pa.int64()),
                         "text": pa.array(texts, pa.string()), "split": [image_splits[o] for o in owners]})
    return CanonicalDataset(images, captions, name="t", images_root=".")


# Few distinct words, spacing and case variants: duplicates and shared texts are frequent; "é" and "\u00a0"
# (Unicode space, which \s matches) check that the normalization is Python's, not a byte-level one.
WORDS = st.sampled_from(["a", "A", "dog", "DOG", "é", "É", "x y"])
SPACES = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0"])
TEXT = st.builds(lambda words, space, pad: pad + space.join(words) + pad,
                 st.lists(WORDS, min_size=1, max_size=5), SPACES, st.sampled_from(["", " ", "\n"]))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_caption_warnings_match_the_reference(data):
    image_splits = data.draw(st.lists(st.sampled_from(SPLITS), min_size=1, max_size=12))
    n_captions = data.draw(st.integers(0, 40))
    owners = data.draw(st.lists(st.integers(0, len(image_splits) - 1), min_size=n_captions, max_size=n_captions))
    texts = data.draw(st.lists(TEXT, min_size=n_captions, max_size=n_captions))
    splits = [image_splits[o] for o in owners]
    spill_rows = data.draw(st.sampled_from([1 << 20, 1, 3]))  # in memory, or through disk in tiny pieces
    found = caption_warnings(dataset(texts, owners, image_splits), LONG_WORDS, spill_rows=spill_rows)
    assert found == reference(texts, owners, splits)


def test_a_text_shared_by_many_evaluation_images_names_the_first_five():
    owners = list(range(7)) + [7, 7]
    texts = ["Same text"] * 7 + ["same  TEXT", "other"]
    ds = dataset(texts, owners, ["test"] * 7 + ["val"])
    assert caption_warnings(ds, LONG_WORDS) == [
        CaptionWarning(0, 0, "shared_across_images", "same text on 7 test images (ids 0, 1, 2, 3, 4, ...)"),
    ]
    assert caption_warnings(dataset(texts, owners, ["train"] * 8), LONG_WORDS) == []


def test_splits_outside_the_three_are_kept_as_given():
    ds = dataset(["a", "a", "b"], [0, 1, 2], ["holdout", "holdout", "val"])
    assert ds.split_of_image(0) == "holdout" and ds.split_of_image(2) == "val"
    assert ds.image_ids("val").tolist() == [2] and ds.counts()["splits"]["val"] == {"images": 1, "captions": 1}
    assert caption_warnings(ds, LONG_WORDS) == [
        CaptionWarning(0, 0, "shared_across_images", "same text on 2 holdout images (ids 0, 1)")
    ]
