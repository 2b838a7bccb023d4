"""fedtextseg info: the model card of a saved model file, its JSON form, and clear errors for broken files."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_predict import make_model_file  # noqa: E402

from fedtextseg.cli import main as cli_main  # noqa: E402
from fedtextseg.errors import FedTextSegError  # noqa: E402
from fedtextseg.model_card import format_card, model_card  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "model.pt"
    return make_model_file(path, dino=True, training={
        "rounds": 3, "sites": ["site-a", "site-b"], "privacy": {"site-a": {"epsilon": 2.5, "delta": 1e-5}}})


def test_card_content(model_path, capsys):
    card = model_card(model_path)
    p = card["model"]["parameters"]
    assert card["model"]["name"] == "cdpdnet_tiny" and "DINOv2 vit_small_patch14_dinov2" in card["model"]["summary"]
    assert p["total"] == p["trainable"] + p["frozen"] and p["frozen"] > 0 and p["trainable"] > 0
    assert card["dino"]["weights"] == "random"
    assert card["text_bank"]["encoder"]["fallback_reason"] == "no CLIP weights offline"
    assert [c["class"] for c in card["classes"]] == ["spleen", "liver"]
    assert card["classes"][1] == {"class": "liver", "value": 6, "sites": ["site-a", "site-b"]}
    assert card["preprocess"]["spacing"] == [1.5, 1.5, 1.5]
    assert card["training"]["rounds"] == 3 and card["training"]["rule"] == "fedavg"
    assert card["privacy"] == {"site-a": {"epsilon": 2.5, "delta": 1e-5}}
    assert any("RANDOM" in w for w in card["warnings"]) and any("fallback" in w for w in card["warnings"])

    text = format_card(card)
    for expected in ("Model card:", "cdpdnet_tiny", "trainable", "frozen", "sentence-minilm", "FALLBACK",
                     card["text_bank"]["content_hash"], "RANDOM weights", "6  liver", "site-a, site-b",
                     "spacing 1.5x1.5x1.5 mm", "rounds", "epsilon", "WARNING: the frozen DINOv2 weights were RANDOM"):
        assert expected in text, expected

    capsys.readouterr()  # only what `info --json` prints below (the fixture's run may print into this capture)
    assert cli_main(["info", str(model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"][0]["class"] == "spleen"
    assert cli_main(["info", str(model_path)]) == 0
    assert "Vocabulary and classes" in capsys.readouterr().out


def test_broken_or_foreign_files_give_clear_errors(model_path, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_path.read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, message in ((truncated, "truncated or corrupt"), (text, "not a fedtextseg model file"),
                          (empty, "empty file"), (tmp_path / "missing.pt", "no such model file")):
        with pytest.raises(FedTextSegError, match=message):
            model_card(path)
        assert cli_main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err and "Traceback" not in err
    import torch

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)  # a torch file, but not a fedtextseg model file
    with pytest.raises(FedTextSegError, match="not a fedtextseg model file"):
        model_card(other)
