"""The universal label space: forgiving, exact-about-failure name look-up, composites, the dataset task table,
prompts, and vocabularies added from YAML without code changes."""

import pytest

from fedtextseg.errors import FedTextSegError
from fedtextseg.vocab import UnknownClassError, UnknownTaskError, Vocabulary, get_vocabulary, normalize_name


def test_the_32_classes_in_reference_order_and_prompts():
    v = get_vocabulary()
    assert v.num_classes == 32 and v.class_names[0] == "spleen" and v.class_names[-1] == "kidney cyst"
    assert v.class_names[8] == "postcava" and v.class_names[24] == "celiac trunk"
    assert v.class_prompts()[5] == "A computerized tomography of a Liver"
    assert v.task_prompts()[3] == "A task of segmenting LiTS in computerized tomography"
    assert v.task_names[0] == "btcv" and len(v.tasks) == 11


@pytest.mark.parametrize("name,canonical", [
    ("IVC", "postcava"), ("inferior_vena_cava", "postcava"), ("Kidney_Left", "left kidney"),
    ("left  kidney", "left kidney"), ("kidney-right", "right kidney"), ("Gallbladder", "gall bladder"),
    ("small bowel", "intestine"), ("Liver Tumour", "liver tumor"), ("adrenal_gland_left", "left adrenal gland"),
])
def test_forgiving_lookup(name, canonical):
    assert get_vocabulary().resolve(name).name == canonical


def test_unknown_names_list_close_matches():
    v = get_vocabulary()
    with pytest.raises(UnknownClassError, match="did you mean 'liver'"):
        v.index("livr")
    with pytest.raises(UnknownClassError) as err:
        v.resolve_many(["spleen", "pancraes", "xyzzy"])
    assert "pancraes" in str(err.value) and "xyzzy" in str(err.value) and "pancreas" in str(err.value)
    with pytest.raises(UnknownTaskError, match="known: btcv"):
        v.task("nonexistent-dataset")


def test_composites_and_tumor_parents():
    v = get_vocabulary()
    assert v.expand("kidneys") == ["right kidney", "left kidney"]
    with pytest.raises(UnknownClassError, match="group of classes"):
        v.resolve("kidney")
    assert v.parent_channels("kidney tumor") == ["right kidney", "left kidney"]
    assert v.parent_channels("liver tumor") == ["liver"] and v.parent_channels("spleen") == []
    assert v.resolve_many(["kidney", "spleen", "liver"]) == ["spleen", "right kidney", "left kidney", "liver"]


def test_partial_label_table_of_public_datasets():
    v = get_vocabulary()
    assert v.task("KiTS19").classes == ("right kidney", "left kidney", "kidney tumor", "kidney cyst")
    assert v.task("msd liver").name == "lits" and set(v.task("lits").classes) == {"liver", "liver tumor"}
    assert len(v.task("btcv").classes) == 14 and "celiac trunk" in v.task("flare").classes


def test_normalize_name_moves_side_first():
    assert normalize_name("Kidney_Left") == normalize_name("left kidney") == "left kidney"


def test_vocabulary_extends_from_yaml_without_code(tmp_path):
    path = tmp_path / "vocab.yaml"
    path.write_text("extends: abdomen-ct\nname: abdomen-plus\nclasses:\n  - name: appendix\n    synonyms: [vermiform appendix]\n"
                    "tasks:\n  - name: appendix-ct\n    display: Appendix-CT\n    classes: [appendix, colon]\n")
    v = get_vocabulary(str(path))
    assert v.num_classes == 33 and v.index("vermiform appendix") == 32 and v.index("IVC") == 8
    assert v.task("appendix-ct").classes == ("appendix", "colon")
    assert v.content_hash != get_vocabulary().content_hash
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: abdomen-ct\ntasks:\n  - name: t\n    classes: [not-a-class]\n")
    with pytest.raises(FedTextSegError, match="bad.yaml.*not a class"):
        get_vocabulary(str(bad))


def test_chest_xray_vocabulary_ships_as_yaml():
    v = get_vocabulary("chest-xray")
    assert v.spatial_dims == 2 and v.index("infection") == 0 and v.default_task == v.task("QaTa-COV19").name


def test_duplicate_names_are_rejected():
    with pytest.raises(FedTextSegError, match="used by both"):
        Vocabulary.from_dict({"name": "x", "classes": [{"name": "a", "synonyms": ["b"]}, {"name": "b"}]})


def test_the_abdominal_vocabulary_is_a_packaged_yaml_file_with_its_recorded_meaning():
    """abdomen-ct lives in fedtextseg/vocabularies/abdomen-ct.yaml like chest-xray; its content hash is the one
    earlier text banks and model files recorded (b42eaaa49530719a, when it was Python tables), so they still load."""
    from importlib import resources

    from fedtextseg.vocab import Vocabulary

    path = resources.files("fedtextseg") / "vocabularies" / "abdomen-ct.yaml"
    from_file = Vocabulary.from_yaml(str(path))
    assert from_file.to_dict() == get_vocabulary("abdomen-ct").to_dict() == get_vocabulary().to_dict()
    assert from_file.content_hash == "b42eaaa49530719a"
    assert from_file.num_classes == 32 and from_file.class_names[0] == "spleen" and len(from_file.tasks) == 11
