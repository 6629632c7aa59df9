"""Builders for WebDataset tests: img2dataset-like shards (``00000.tar`` + ``00000.parquet``) written with the
webdataset package's own TarWriter, so that our reader is tested against shards it did not write."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png_bytes(colour=(10, 120, 200), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict], listed: list[dict] | None = None) -> Path:
    """``samples``: webdataset sample dicts (``__key__``, ``jpg``/``png`` bytes, ``txt`` str, ``json`` dict).
    Beside the tar, img2dataset's table: one row per sample (status "success") plus ``listed`` (extra rows,
    e.g. failed downloads)."""
    from webdataset import TarWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    rows = [
        {
            "key": s["__key__"],
            # img2dataset's table holds one caption string: a sample with a list of them leaves it empty.
            "caption": _one_caption(s.get("txt", s.get("json", {}).get("caption"))),
            "status": "success",
            "error_message": None,
        }
        for s in samples
    ] + list(listed or [])
    schema = pa.schema(
        [("key", pa.string()), ("caption", pa.string()), ("status", pa.string()), ("error_message", pa.string())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path.with_suffix(".parquet"))
    return path


def shards_from_canonical(ds, out: Path, per_shard: int) -> Path:
    """The canonical dataset ``ds`` (one caption per image, image files) as WebDataset shards in image order:
    the same image bytes, caption and split, so that both give the same store rows."""
    texts = ds.texts(ds.caption_ids())
    owners = ds.caption_image_ids().tolist()
    caption_of = dict(zip(owners, texts, strict=True))
    assert len(caption_of) == ds.num_images, "one caption per image"
    ids = ds.image_ids().tolist()
    for shard, start in enumerate(range(0, len(ids), per_shard)):
        samples = []
        for image_id in ids[start : start + per_shard]:
            path = ds.image_path(image_id)
            samples.append(
                {
                    "__key__": f"{shard:05d}{image_id:04d}",
                    path.suffix.lstrip(".").lower(): path.read_bytes(),
                    "txt": caption_of[image_id],
                    "json": {"split": ds.split_of_image(image_id)},
                }
            )
        write_shard(out / f"{shard:05d}.tar", samples)
    return out


def _one_caption(caption):
    return caption if caption is None or isinstance(caption, str) else None
