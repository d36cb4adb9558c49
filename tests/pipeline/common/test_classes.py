"""Class files: names, colours and the ignore index, and one sentence naming the file for every problem."""
from __future__ import annotations

import pytest

from segmill.pipeline.common.classes import find_class_file, load_class_file


def test_class_file_reads_names_colours_and_ignore_index(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text("classes:\n  - {name: sky, colour: [1, 2, 3]}\n  - road\nignore_index: 254\n")
    classes = load_class_file(str(path))
    assert classes.names == ("sky", "road") and classes.palette[0] == (1, 2, 3) and classes.ignore_index == 254
    assert len(classes.palette[1]) == 3


@pytest.mark.parametrize("text, fragment", [
    ("classes: []\n", "non-empty list"),
    ("classes: [sky, sky]\n", "twice"),
    ("classes: [{name: sky, colour: [1, 2]}]\n", "three integers"),
    ("classes: [sky, road]\nignore_index: 1\n", "ignore_index"),
    ("classes: [: bad\n", "not valid YAML"),
])
def test_bad_class_file_is_one_sentence_naming_it(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment) as info:
        load_class_file(str(path))
    assert str(path) in str(info.value)


def test_a_label_sets_class_file_is_found_in_or_beside_its_folder(tmp_path):
    (tmp_path / "set" / "labels").mkdir(parents=True)
    assert find_class_file(str(tmp_path / "set" / "labels")) is None
    (tmp_path / "set" / "classes.yaml").write_text("classes: [sky, road]\n")
    assert find_class_file(str(tmp_path / "set" / "labels")).names == ("sky", "road")
    (tmp_path / "set" / "labels" / "classes.yaml").write_text("classes: [a, b, c]\n")
    assert find_class_file(str(tmp_path / "set" / "labels")).names == ("a", "b", "c")  # the nearer one wins
