"""Tests of the text-embedding bank and the offline text encoders (fedtextseg.text), with real components only.

Every test runs offline with the Hugging Face cache pointed at an empty temporary folder, so a developer's real
cache cannot change results. The CLIP weight paths are exercised with a tiny open_clip architecture registered for
the test, saved as a checkpoint file and placed in a hub-cache layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fedtextseg.text import (
    EmbeddingBank,
    EmbeddingBankError,
    EncoderWeightsUnavailable,
    TextEncoderError,
    build_bank,
    embed_text_main,
    encode_texts,
    load_clip_text_tower,
)
from fedtextseg.vocab import get_vocabulary

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clip-reference"
TINY_CLIP = "fts-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def offline_empty_hub_cache(tmp_path, monkeypatch):
    """No network, and a hub cache that holds nothing unless a test puts it there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return tmp_path / "hf-home" / "hub"


@pytest.fixture(scope="module")
def minilm_bank():
    return build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda line: None)


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A tiny open_clip architecture registered for this test module, and a safetensors checkpoint of it."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = open_clip.create_model(TINY_CLIP, pretrained=None, force_quick_gelu=True)
    checkpoint = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return checkpoint


def _bank(rows: int = 3, dim: int = 8, seed: int = 0, **overrides) -> EmbeddingBank:
    names = get_vocabulary().class_names[:rows]
    generator = torch.Generator().manual_seed(seed)
    fields = dict(
        class_names=names,
        class_embeddings=torch.randn(rows, dim, generator=generator),
        task_names=["btcv", "lits"],
        task_embeddings=torch.randn(2, dim, generator=generator),
        class_template="A computerized tomography of a {}",
        task_template="A task of segmenting {} in computerized tomography",
        vocabulary="abdomen-ct",
        vocabulary_hash=get_vocabulary().content_hash,
        encoder={"kind": "tensor-file", "model": None, "pretrained": None},
    )
    fields.update(overrides)
    return EmbeddingBank(**fields)


def _cos(bank: EmbeddingBank, a: str, b: str) -> float:
    return float(torch.nn.functional.cosine_similarity(bank.class_embedding(a), bank.class_embedding(b), dim=0))


# ---------------------------------------------------------------------- the bank file
def test_save_load_round_trip_keeps_everything_and_leaves_no_temp_file(tmp_path):
    bank = _bank(encoder={"kind": "clip", "model": "ViT-B-32", "pretrained": "openai", "weights_path": "/w.pt"})
    path = bank.save(tmp_path / "banks" / "bank.pt")
    loaded = EmbeddingBank.load(path)
    assert torch.equal(loaded.class_embeddings, bank.class_embeddings)
    assert torch.equal(loaded.task_embeddings, bank.task_embeddings)
    assert loaded.class_names == bank.class_names and loaded.task_names == ["btcv", "lits"]
    assert loaded.content_hash == bank.content_hash and len(bank.content_hash) == 16
    assert loaded.encoder == bank.encoder
    assert os.listdir(path.parent) == ["bank.pt"]
    provenance = loaded.provenance()
    assert provenance["content_hash"] == bank.content_hash
    assert (provenance["dim"], provenance["num_classes"], provenance["num_tasks"]) == (8, 3, 2)
    assert provenance["encoder"]["pretrained"] == "openai"
    json.dumps(provenance)  # run metadata must be JSON-able
    assert EmbeddingBank.from_dict(bank.to_dict()).content_hash == bank.content_hash


def test_content_hash_follows_tensors_templates_and_encoder_identity_only():
    bank = _bank()
    assert _bank().content_hash == bank.content_hash
    changed = bank.class_embeddings.clone()
    changed[1, 2] += 1e-3
    assert _bank(class_embeddings=changed).content_hash != bank.content_hash
    assert _bank(task_template="Segment {}").content_hash != bank.content_hash
    assert _bank(encoder={"kind": "clip", "model": "ViT-B-32", "pretrained": "openai"}).content_hash != bank.content_hash
    with_note = _bank(encoder={**bank.encoder, "weights_path": "/elsewhere/w.pt"})
    assert with_note.content_hash == bank.content_hash  # paths and notes are provenance, not identity


def test_tampered_file_raises_naming_the_file(tmp_path):
    path = _bank().save(tmp_path / "bank.pt")
    data = torch.load(path, weights_only=True)
    data["class_embeddings"][0, 0] += 0.5
    torch.save(data, path)
    with pytest.raises(EmbeddingBankError, match=r"bank\.pt: embedding bank content hash mismatch"):
        EmbeddingBank.load(path)


@pytest.mark.parametrize("damage", ["truncate", "foreign", "missing"])
def test_unreadable_or_foreign_file_raises_naming_the_file(tmp_path, damage):
    path = tmp_path / "bank.pt"
    if damage == "truncate":
        _bank().save(path)
        path.write_bytes(path.read_bytes()[:200])
        expected = "cannot read embedding bank"
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        expected = "not a fedtextseg embedding bank"
    else:
        expected = "embedding bank file not found"
    with pytest.raises(EmbeddingBankError, match=expected) as info:
        EmbeddingBank.load(path)
    assert str(path) in str(info.value)


def test_inconsistent_bank_is_refused():
    with pytest.raises(EmbeddingBankError, match="2 class embedding rows for 3 class names"):
        _bank(class_embeddings=torch.zeros(2, 8))
    with pytest.raises(EmbeddingBankError, match="class embeddings are 8-d but task embeddings are 4-d"):
        _bank(task_embeddings=torch.zeros(2, 4))


# ---------------------------------------------------------------------- look-up
def test_lookup_accepts_synonyms_and_groups_and_rejects_unknown_names():
    vocab = get_vocabulary()
    bank = _bank(rows=vocab.num_classes)
    assert torch.equal(bank.class_embedding("IVC"), bank.class_embeddings[vocab.index("postcava")])
    assert bank.class_indices(["kidneys", "Liver"]) == [1, 2, 5]
    assert bank.select_classes(["kidney", "liver"]).shape == (3, 8)
    assert torch.equal(bank.task_embedding("MSD Liver"), bank.task_embeddings[1])  # alias of LiTS
    with pytest.raises(EmbeddingBankError, match="group of classes"):
        bank.class_embedding("kidney")
    with pytest.raises(EmbeddingBankError) as info:
        bank.class_embedding("livr tumour")
    message = str(info.value)
    assert "'livr tumour'" in message and "liver tumor" in message
    assert "re-encode the bank with `fedtextseg embed-text` to add a class" in message
    with pytest.raises(EmbeddingBankError, match="task 'word' is not in this embedding bank"):
        bank.task_embedding("WORD")


def test_vocabulary_class_missing_from_the_bank_is_named(tmp_path):
    class_file = tmp_path / "two.npy"
    np.save(class_file, np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32))
    bank = EmbeddingBank.from_tensor_files(class_file, class_names=["Liver", "liver tumour"])
    assert bank.class_names == ["liver", "liver tumor"]
    assert torch.equal(bank.class_embedding("hepar"), bank.class_embeddings[0])
    with pytest.raises(EmbeddingBankError) as info:
        bank.select_classes(["liver", "kidney tumor"])
    message = str(info.value)
    assert "'kidney tumor' is not in this embedding bank" in message and "'liver tumor'" in message
    assert "fedtextseg embed-text" in message


# ---------------------------------------------------------------------- precomputed tensors
def test_tensor_files_with_wrong_row_counts_name_the_wrong_file(tmp_path):
    rng = np.random.default_rng(0)
    classes, tasks, short = tmp_path / "classes.npy", tmp_path / "tasks.pt", tmp_path / "short.npy"
    np.save(classes, rng.normal(size=(32, 16)).astype(np.float32))
    torch.save(torch.randn(11, 16), tasks)
    np.save(short, rng.normal(size=(31, 16)).astype(np.float32))
    bank = EmbeddingBank.from_tensor_files(classes, tasks)
    assert (bank.num_classes, bank.num_tasks, bank.dim) == (32, 11, 16)
    assert torch.allclose(bank.class_embeddings.norm(dim=1), torch.ones(32))
    with pytest.raises(EmbeddingBankError, match=r"short\.npy: has 31 rows but vocabulary 'abdomen-ct' needs 32 class"):
        EmbeddingBank.from_tensor_files(short, tasks)
    with pytest.raises(EmbeddingBankError, match=r"classes\.npy: has 32 rows .* 11 task embeddings .*swapped"):
        EmbeddingBank.from_tensor_files(classes, classes)
    with pytest.raises(EmbeddingBankError, match=r"missing\.npy: embedding file not found"):
        EmbeddingBank.from_tensor_files(tmp_path / "missing.npy")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference CLIP embeddings ../shared/data/clip-reference absent")
def test_reference_clip_vectors_load_as_a_sensible_bank(tmp_path):
    bank = EmbeddingBank.from_tensor_files(
        REFERENCE / "txt_encoding.npy", REFERENCE / "txt_task_encoding.npy", source_model="CLIP ViT-B-32 openai"
    )
    assert (bank.num_classes, bank.num_tasks, bank.dim) == (32, 11, 512)
    assert _cos(bank, "liver", "liver tumor") > _cos(bank, "liver", "left head of femur") + 0.1
    assert _cos(bank, "right kidney", "left kidney") > _cos(bank, "right kidney", "esophagus")
    assert bank.task_embedding("LiTS").shape == (512,)
    loaded = EmbeddingBank.load(bank.save(tmp_path / "reference.pt"))
    assert loaded.content_hash == bank.content_hash and loaded.encoder["model"] == "CLIP ViT-B-32 openai"
    raw = EmbeddingBank.from_tensor_files(REFERENCE / "txt_encoding.npy", normalize=False)
    assert raw.class_embeddings.norm(dim=1).min() > 5  # the release's vectors are not unit length
    assert raw.num_tasks == 0


# ---------------------------------------------------------------------- encoders
def test_missing_clip_weights_without_fallback_raise_with_instructions(offline_empty_hub_cache):
    lines = []
    with pytest.raises(EncoderWeightsUnavailable) as info:
        build_bank("abdomen-ct", encoder="clip", pretrained="openai", log=lines.append)
    message = str(info.value)
    assert str(offline_empty_hub_cache) in message and "ViT-B-32/openai" in message
    assert "local checkpoint file" in message and "hub cache" in message and "allow_fallback" in message
    assert lines == []


def test_missing_clip_weights_with_fallback_give_a_declared_minilm_bank(capsys):
    bank = build_bank("abdomen-ct", encoder="clip", model="ViT-B-32", pretrained="openai", allow_fallback=True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert "no CLIP weights for ViT-B-32/openai" in printed[0] and "sentence-minilm" in printed[0]
    assert bank.dim == 384 and bank.encoder["kind"] == "sentence-minilm"
    assert "ViT-B-32/openai" in bank.encoder["fallback_reason"]
    assert bank.encoder["requested"] == {"kind": "clip", "model": "ViT-B-32", "pretrained": "openai"}
    assert "Fallback used" in bank.describe()


def test_minilm_embeddings_are_unit_length_and_semantically_sensible(minilm_bank):
    assert minilm_bank.class_embeddings.shape == (32, 384) and minilm_bank.task_embeddings.shape == (11, 384)
    assert torch.allclose(minilm_bank.class_embeddings.norm(dim=1), torch.ones(32), atol=1e-5)
    assert _cos(minilm_bank, "liver", "liver tumor") > _cos(minilm_bank, "liver", "left head of femur") + 0.2
    assert _cos(minilm_bank, "right kidney", "left kidney") > _cos(minilm_bank, "right kidney", "aorta")
    sentences, provenance = encode_texts(
        ["bilateral pulmonary infection", "infection in both lungs", "a healthy femur"], "sentence-minilm"
    )
    similarity = sentences @ sentences.T
    assert similarity[0, 1] > similarity[0, 2] and provenance["model"].endswith("all-MiniLM-L6-v2")


def test_random_init_clip_encodes_512_d_and_warns():
    lines = []
    vectors, provenance = encode_texts(["liver", "spleen"], {"kind": "clip", "pretrained": None}, log=lines.append)
    assert vectors.shape == (2, 512) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    assert provenance["pretrained"] == "random-init" and provenance["seed"] == 0
    assert len(lines) == 1 and "random weights" in lines[0]


def test_encode_texts_rejects_a_bare_string_and_unknown_settings():
    with pytest.raises(TextEncoderError, match="single string"):
        encode_texts("liver", "sentence-minilm")
    with pytest.raises(TextEncoderError, match="unknown text encoder 'bert'"):
        encode_texts(["liver"], "bert")
    with pytest.raises(TextEncoderError, match="unknown key"):
        encode_texts(["liver"], {"kind": "clip", "weights": "x"})
    with pytest.raises(TextEncoderError, match="unknown open_clip pretrained tag 'opnai'.*openai"):
        encode_texts(["liver"], {"kind": "clip", "pretrained": "opnai"})


def test_clip_checkpoint_file_is_loaded_and_bad_files_are_named(tiny_clip_checkpoint, tmp_path):
    tower = load_clip_text_tower(TINY_CLIP, str(tiny_clip_checkpoint))
    assert tower.provenance["weights_source"] == "file"
    assert tower.model.text_projection.requires_grad  # a fresh, trainable model, not the cached encoder
    vectors, provenance = encode_texts(["liver"], {"kind": "clip", "model": TINY_CLIP,
                                                   "pretrained": str(tiny_clip_checkpoint)})
    assert provenance["pretrained"] == str(tiny_clip_checkpoint.resolve()) and vectors.shape == (1, 32)
    with pytest.raises(EncoderWeightsUnavailable, match=r"nowhere\.safetensors not found"):
        load_clip_text_tower(TINY_CLIP, str(tmp_path / "nowhere.safetensors"))
    folder = tmp_path / "clip-folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    (folder / "open_clip_model.safetensors").write_bytes(tiny_clip_checkpoint.read_bytes())
    from_folder, folder_provenance = encode_texts(["liver"], {"kind": "clip", "model": f"local-dir:{folder}"})
    assert folder_provenance["weights_source"] == "local-dir" and torch.allclose(from_folder, vectors, atol=1e-5)
    with pytest.raises(EncoderWeightsUnavailable, match="no-such-folder not found"):
        encode_texts(["liver"], {"kind": "clip", "model": f"local-dir:{tmp_path / 'no-such-folder'}"})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(TextEncoderError, match=r"broken\.safetensors: cannot load CLIP"):
        load_clip_text_tower(TINY_CLIP, str(broken))


def test_clip_tag_is_resolved_from_the_hub_cache_offline(tiny_clip_checkpoint, offline_empty_hub_cache, monkeypatch):
    import open_clip

    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, TINY_CLIP, {"fts": {"hf_hub": "fedtextseg-test/tiny-clip/", "quick_gelu": True}}
    )
    with pytest.raises(EncoderWeightsUnavailable, match="fedtextseg-test/tiny-clip"):
        build_bank("chest-xray", model=TINY_CLIP, pretrained="fts", log=print)
    repo = offline_empty_hub_cache / "models--fedtextseg-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors").write_bytes(tiny_clip_checkpoint.read_bytes())
    bank = build_bank("chest-xray", model=TINY_CLIP, pretrained="fts", log=print)
    assert bank.encoder["weights_source"] == "hub-cache" and bank.encoder["quick_gelu"] is True
    assert "fallback_reason" not in bank.encoder and bank.dim == 32
    tower = load_clip_text_tower(TINY_CLIP, str(tiny_clip_checkpoint))  # same weights, from the file
    prompt = get_vocabulary("chest-xray").class_prompts()[0]
    with torch.no_grad():
        # the tag's quick_gelu is applied, so these differ from the plain-GELU model built from the file
        plain = torch.nn.functional.normalize(tower.model.encode_text(tower.tokenizer([prompt])), dim=1)[0]
    assert not torch.allclose(bank.class_embeddings[0], plain, atol=1e-4)
    quick = load_clip_text_tower(TINY_CLIP, "fts")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(quick.model.encode_text(quick.tokenizer([prompt])), dim=1)[0]
    assert torch.allclose(bank.class_embeddings[0], expected, atol=1e-5)


# ---------------------------------------------------------------------- CLI
def test_embed_text_cli_writes_a_bank_and_reports_errors(tmp_path, capsys, minilm_bank):
    out = tmp_path / "bank.pt"
    assert embed_text_main(["--encoder", "sentence-minilm", "--vocabulary", "abdomen-ct", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    bank = EmbeddingBank.load(out)
    assert bank.content_hash == minilm_bank.content_hash and bank.content_hash in summary
    assert "32 classes and 11 tasks" in summary and "384-d" in summary
    assert embed_text_main(["--pretrained", "openai", "--out", str(tmp_path / "clip.pt")]) == 1
    assert "--allow-fallback" in capsys.readouterr().err and not (tmp_path / "clip.pt").exists()
    classes = tmp_path / "c.npy"
    np.save(classes, np.ones((3, 4), np.float32))
    assert embed_text_main(["--from-tensors", str(classes), "--vocabulary", "chest-xray", "--out", str(out)]) == 0
    assert EmbeddingBank.load(out).encoder["kind"] == "tensor-file"
