"""What DVC tracks for the store (extract.tracked): the store itself when it is local, its manifest when it is on S3.

DVC 3 cannot cache an output in a bucket, and dvc.yaml is fixed text, so its extract output (and distill's and
evaluate's dependency) is `${extract.tracked}`, a local path: equal to extract.store for a local store, a .json
manifest (store/manifest.py) that every writing extract command rewrites for a store on S3. docs/s3_dvc.md.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from pipeline.config import Config
from pipeline.console import console
from pipeline.errors import DsmdError
from store.manifest import write_manifest
from store.remote import is_remote


def check_tracked(cfg: Config) -> None:
    """A store on S3 needs a local .json extract.tracked: without it DVC would track a stale local path."""
    store, tracked = cfg.extract.store, cfg.extract.tracked
    if not is_remote(store):
        if not is_remote(tracked) and Path(tracked) != Path(store):
            # Not an error: run directly, extract ignores extract.tracked; under DVC the stage would then fail on
            # a missing output, and this line says why.
            console.print(f"[yellow]extract.tracked ({escape(tracked)}) is not extract.store ({escape(store)}): "
                          "dvc.yaml tracks extract.tracked, so for a local store set both to the same path[/yellow]")
        return
    if is_remote(tracked) or not tracked.endswith(".json"):
        raise DsmdError(
            f"extract.store {store} is in a bucket, which DVC cannot track, but extract.tracked is {tracked!r}: set "
            "extract.tracked to a local .json file (e.g. data/features.s3.json) where dsmd extract records the store "
            "for DVC (docs/s3_dvc.md)"
        )


def record_store(cfg: Config) -> None:
    """For a store on S3, rewrite its manifest at extract.tracked (nothing to do for a local store)."""
    if not is_remote(cfg.extract.store):
        return
    check_tracked(cfg)
    body = write_manifest(cfg.extract.store, Path(cfg.extract.tracked))
    done = sum(array["shards_done"] for array in body["arrays"].values())
    console.print(f"recorded {cfg.extract.store} ({len(body['arrays'])} arrays, {done} finished shards) in "
                  f"{cfg.extract.tracked} for DVC", highlight=False)
