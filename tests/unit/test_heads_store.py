"""The directory head store: per-tenant layout, versions taken once across processes, deleted numbers never reused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing

import pytest

from featurebank.server.head_store import DirectoryHeadStore, HeadVersionTakenError
from featurebank.v1 import featurebank_pb2 as pb


def _put_many(root: str, count: int) -> list[int]:
    store = DirectoryHeadStore(root)
    return [asyncio.run(store.create("t", pb.Head(name="racy", kind=f"k{i}"))) for i in range(count)]


def test_processes_sharing_a_directory_get_distinct_versions(tmp_path):
    """4 processes putting 5 heads of one name each into one directory get versions 1..20, each written once."""
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        versions = [v for vs in pool.map(_put_many, [str(tmp_path)] * 4, [5] * 4) for v in vs]
    assert sorted(versions) == list(range(1, 21))
    store = DirectoryHeadStore(str(tmp_path))
    assert asyncio.run(store.versions("t", "racy")) == list(range(1, 21))
    assert not list((tmp_path / "tenants" / "t" / "racy").glob(".*.tmp"))  # no temporary file left behind


async def test_tenants_are_separate_and_deleted_versions_stay_taken(tmp_path):
    """Two tenants' heads of one name are separate; a deleted version's number is never given out or written again."""
    store = DirectoryHeadStore(str(tmp_path))
    assert await store.create("a", pb.Head(name="clf", kind="a")) == 1
    assert await store.create("b", pb.Head(name="clf", kind="b")) == 1
    assert await store.create("", pb.Head(name="clf", kind="none")) == 1  # no tokens: the default namespace
    assert (await store.read("a", "clf", 1)).kind == "a" and (await store.read("b", "clf", 1)).kind == "b"
    assert await store.owners() == ["", "a", "b"] and await store.names("a") == ["clf"]
    assert await store.create("a", pb.Head(name="clf")) == 2
    assert await store.remove("a", "clf", 2) == 1
    with pytest.raises(HeadVersionTakenError):
        await store.create("a", pb.Head(name="clf", version=2))
    with pytest.raises(HeadVersionTakenError):
        await store.create("a", pb.Head(name="clf", version=1))
    assert await store.create("a", pb.Head(name="clf")) == 3
    assert await store.create("a", pb.Head(name="clf", version=10)) == 10
    assert [i.version for i in await store.infos("a", "clf")] == [1, 3, 10]
    assert await store.remove("a", "clf", 0) == 3 and await store.names("a") == []
    assert await store.create("a", pb.Head(name="clf")) == 11
    assert (await store.read("b", "clf", 1)).kind == "b"
