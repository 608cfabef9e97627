"""A logit store checked out of the DVC cache is hard-linked (`.dvc/config` cache.type): writing to
it must replace a chunk file, never write through the link into the cache object."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr


def test_zarr_chunk_writes_replace_files_instead_of_writing_through_hard_links(tmp_path: Path) -> None:
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 8), chunks=(1, 8), dtype="float32",
                              fill_value=0)
    array[0] = np.arange(8, dtype="float32")
    chunk = next(p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file() and p.name == "0"
                 and p.parent.name == "0")
    cache_object = tmp_path / "cache-object"
    os.link(chunk, cache_object)  # what `dvc checkout` with cache.type hardlink leaves
    before = cache_object.read_bytes()
    array[0] = np.full(8, 7, dtype="float32")
    assert cache_object.read_bytes() == before  # the cache's copy is untouched
    assert os.stat(chunk).st_ino != os.stat(cache_object).st_ino
    assert (zarr.open_array(str(tmp_path / "a.zarr"))[0] == 7).all()


def test_dvc_config_links_instead_of_copying(repo_root: Path) -> None:
    text = (repo_root / ".dvc/config").read_text()
    assert 'type = "reflink,hardlink,copy"' in text
