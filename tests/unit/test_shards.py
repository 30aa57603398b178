"""Shard reading: index, damaged shards, slot assignment (every sample once per epoch), exact resume."""

import io
import tarfile
from collections import Counter

import pytest

from genlip_mcore.data.shards import MixedReader, SourceReader, index_shard, read_sample, split_key


def write_shard(path, keys, payload=b"x" * 700):
    with tarfile.open(path, "w") as tar:
        for k in keys:
            for ext, data in (("jpg", payload), ("json", b'{"caption": "%s"}' % k.encode())):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def shards(tmp_path):
    return [write_shard(tmp_path / f"s{i}.tar", [f"s{i}-{j:03d}" for j in range(10 + i)]) for i in range(6)]


def test_split_key_follows_webdataset():
    assert split_key("dir/abc.def.jpg") == ("dir/abc", "def.jpg")
    assert split_key("abc.JPG") == ("abc", "jpg")


def test_index_and_read(shards):
    skips = Counter()
    refs = index_shard(shards[0], skips)
    assert [r.key for r in refs] == [f"s0-{j:03d}" for j in range(10)] and not skips
    data = read_sample(refs[3])
    assert data["json"] == b'{"caption": "s0-003"}' and len(data["jpg"]) == 700


def test_truncated_and_unreadable_shards_are_counted(tmp_path, shards):
    raw = open(shards[1], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:len(raw) // 2 + 100])                   # ends inside a member
    skips = Counter()
    refs = index_shard(str(cut), skips)
    assert 0 < len(refs) < 11 and skips == {"truncated_tar": 1}
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    skips = Counter()
    assert index_shard(str(junk), skips) == [] and skips == {"unreadable_shard": 1}
    skips = Counter()
    assert index_shard(str(tmp_path / "missing.tar"), skips) == [] and skips == {"unreadable_shard": 1}


def _epoch_keys(reader, epoch=0):
    keys = []
    while True:
        s = reader.next()
        if s.epoch != epoch:
            return keys, s
        keys.append(s.key)


def test_slots_cover_every_sample_exactly_once_per_epoch(shards):
    expected = sorted(f"s{i}-{j:03d}" for i in range(6) for j in range(10 + i))
    for num_slots in (1, 2, 4):
        seen = []
        for slot in range(num_slots):
            keys, _ = _epoch_keys(SourceReader(shards, 0, seed=7, slot=slot, num_slots=num_slots, shuffle_shards=2))
            seen += keys
        assert sorted(seen) == expected, num_slots


def test_epochs_reshuffle_and_seeds_differ(shards):
    r = SourceReader(shards, 0, seed=7, slot=0, num_slots=1, shuffle_shards=2)
    e0, first_of_e1 = _epoch_keys(r, 0)
    e1, _ = _epoch_keys(r, 1)
    assert sorted(e0) == sorted([first_of_e1.key] + e1) and e0 != [first_of_e1.key] + e1
    other, _ = _epoch_keys(SourceReader(shards, 0, seed=8, slot=0, num_slots=1, shuffle_shards=2))
    assert other != e0


def test_resume_continues_exactly(shards):
    def make():
        return MixedReader([shards[:3], shards[3:]], [1.0, 3.0], seed=1, slot=1, num_slots=2, shuffle_shards=2)

    straight = make()
    keys = [next(straight).key for _ in range(70)]
    a = make()
    head = [next(a).key for _ in range(23)]
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    assert head + [next(b).key for _ in range(47)] == keys


def test_mixing_follows_weights(shards):
    r = MixedReader([shards[:3], shards[3:]], [1.0, 3.0], seed=1, slot=0, num_slots=1, shuffle_shards=1)
    sources = Counter(next(r).source for _ in range(2000))
    assert abs(sources[1] / 2000 - 0.75) < 0.04


def test_too_few_shards_for_the_slots_is_a_clear_error(shards):
    with pytest.raises(ValueError, match=r"data.sources\[0\]: 2 shards for 4 reader slots"):
        SourceReader(shards[:2], 0, seed=0, slot=0, num_slots=4, shuffle_shards=1)


def test_all_unreadable_stops_instead_of_spinning(tmp_path):
    bad = []
    for i in range(2):
        (tmp_path / f"b{i}.tar").write_bytes(b"garbage" * 50)
        bad.append(str(tmp_path / f"b{i}.tar"))
    r = SourceReader(bad, 0, seed=0, slot=0, num_slots=1, shuffle_shards=1)
    with pytest.raises(RuntimeError, match="no readable sample"):
        r.next()
