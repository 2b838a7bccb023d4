"""Hash-once transfer of frozen common arrays: hashing, files, the server-side distributor, the client cache."""

from __future__ import annotations

import numpy as np
import pytest

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation import FrozenBundle, FrozenCache, FrozenDistributor


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"dino.blocks.0.w": rng.normal(size=(64, 64)).astype(np.float32),
            "text.bank": rng.normal(size=(8, 16)).astype(np.float32), "dino.scale": np.array(2.0)}


def _bundle() -> FrozenBundle:
    return FrozenBundle(_arrays(), {"source": "random-init", "model": "vit_small_patch14_dinov2"})


def test_hash_is_stable_and_ignores_order_and_meta():
    a = _bundle()
    b = FrozenBundle(dict(reversed(list(_arrays().items()))), {"other": "meta"})
    assert a.content_hash == b.content_hash == _bundle().content_hash
    assert len(a.content_hash) == 64
    assert a.nbytes == 64 * 64 * 4 + 8 * 16 * 4 + 8


def test_hash_changes_on_one_byte_dtype_shape_or_key():
    base = _bundle().content_hash
    arrays = _arrays()
    raw = arrays["text.bank"].reshape(-1).view(np.uint8).copy()
    raw[37] ^= 1
    arrays["text.bank"] = raw.view(np.float32).reshape(8, 16)
    assert FrozenBundle(arrays).content_hash != base
    arrays = _arrays()
    arrays["text.bank"] = arrays["text.bank"].reshape(16, 8)
    assert FrozenBundle(arrays).content_hash != base
    arrays = _arrays()
    arrays["dino.scale"] = np.array(2.0, np.float32)  # same value, other dtype
    assert FrozenBundle(arrays).content_hash != base
    arrays = _arrays()
    arrays["text.bank2"] = arrays.pop("text.bank")
    assert FrozenBundle(arrays).content_hash != base


def test_bundle_arrays_are_read_only():
    b = _bundle()
    with pytest.raises(ValueError):
        b.arrays["text.bank"][0, 0] = 1.0


def test_save_load_round_trip(tmp_path):
    b = _bundle()
    path = b.save(tmp_path / "frozen.bin")
    loaded = FrozenBundle.load(path)
    assert loaded.content_hash == b.content_hash and loaded.meta == b.meta
    for k, v in b.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[k], v)
        assert loaded.arrays[k].dtype == v.dtype and loaded.arrays[k].shape == v.shape
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_names_the_file(tmp_path, damage):
    path = _bundle().save(tmp_path / "frozen.bin")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # middle of the 16 KiB array payload
    else:
        data = data[: len(data) - 40]
    path.write_bytes(bytes(data))
    with pytest.raises(FedTextSegError, match="frozen.bin: corrupt or incomplete frozen bundle"):
        FrozenBundle.load(path)


def test_verify():
    b = _bundle()
    b.verify(b.content_hash)
    with pytest.raises(FedTextSegError, match="does not match"):
        b.verify("0" * 64)


def test_distributor_sends_once_per_node_and_resends_after_missing():
    b = _bundle()
    d = FrozenDistributor(b)
    assert d.payload_for(1) is b
    assert d.payload_for(1) is None
    assert d.payload_for(2) is b and d.payload_for(2) is None
    d.mark_missing(1)  # node 1 replied "missing-frozen"
    assert d.payload_for(1) is b and d.payload_for(1) is None
    assert d.payload_for(2) is None
    d.mark_holding(3, b.content_hash)  # node 3 already had it in its cache
    assert d.payload_for(3) is None

    restored = FrozenDistributor(b)
    restored.load_state_dict(d.state_dict())  # e.g. after a server restart from a checkpoint
    assert restored.holds(1) and restored.holds("2") and restored.payload_for(4) is b

    new = FrozenBundle({"x": np.ones(3)})
    d.set_bundle(new)
    assert d.payload_for(1) is new and d.payload_for(2) is new and d.payload_for(2) is None
    assert FrozenDistributor(None).payload_for(1) is None


def test_cache_survives_restart_and_drops_corrupt_files(tmp_path):
    b = _bundle()
    cache = FrozenCache(tmp_path / "cache")
    assert cache.get(b.content_hash) is None and cache.hashes() == []
    path = cache.put(b)
    assert path.name == f"{b.content_hash}.frozen"
    again = FrozenCache(tmp_path / "cache")  # a new ClientApp process
    got = again.get(b.content_hash)
    assert got is not None and got.content_hash == b.content_hash
    assert again.hashes() == [b.content_hash]

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert again.get(b.content_hash) is None  # reported as missing -> client asks for it again
    assert not path.exists()

    other = FrozenBundle({"x": np.ones(2)})
    cache.put(b), cache.put(other)
    assert cache.prune({other.content_hash}) == [b.content_hash]
    assert cache.hashes() == [other.content_hash]
    with pytest.raises(FedTextSegError, match="not a frozen-bundle hash"):
        cache.get("../../etc/passwd")


def test_cache_rejects_file_whose_content_is_another_bundle(tmp_path):
    b, other = _bundle(), FrozenBundle({"x": np.ones(2)})
    cache = FrozenCache(tmp_path)
    other.save(cache.path_for(b.content_hash))  # a misnamed file
    assert cache.get(b.content_hash) is None
