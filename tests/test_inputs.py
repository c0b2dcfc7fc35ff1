"""Expanding --slides: files, folders, globs, CSV lists; nothing named by the user is dropped."""

from __future__ import annotations

from nic.slides.inputs import expand_slide_inputs, slide_id_for


def test_folder_glob_file_and_csv(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.tiff").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "dir.svs").mkdir()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.ndpi").write_bytes(b"x")
    lst = tmp_path / "list.csv"
    lst.write_text("path,slide_id\nsub/c.ndpi,case-c\n")

    from_folder = expand_slide_inputs([str(tmp_path)])
    assert [i.slide_id for i in from_folder] == ["a", "b", "dir"]  # the folder named dir.svs is kept, to be reported
    assert all(i.error is None for i in from_folder)

    from_glob = expand_slide_inputs([str(tmp_path / "*.tiff")])
    assert [i.slide_id for i in from_glob] == ["b"]

    from_csv = expand_slide_inputs([str(lst)])
    assert [(i.slide_id, i.path) for i in from_csv] == [("case-c", str(tmp_path / "sub" / "c.ndpi"))]


def test_missing_paths_and_empty_matches_become_errors(tmp_path):
    items = expand_slide_inputs([str(tmp_path / "nope.svs"), str(tmp_path / "*.mrxs"), str(tmp_path)])
    assert len(items) == 3
    assert "no such file" in items[0].error and str(tmp_path / "nope.svs") in items[0].error
    assert "no file matches" in items[1].error
    assert "holds no slide files" in items[2].error


def test_same_file_twice_is_one_input_and_id_clash_is_reported(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "s.svs").write_bytes(b"1")
    (tmp_path / "y" / "s.svs").write_bytes(b"2")
    items = expand_slide_inputs([str(tmp_path / "x" / "s.svs"), str(tmp_path / "x" / "s.svs"),
                                 str(tmp_path / "y" / "s.svs")])
    assert len(items) == 2
    assert items[0].error is None
    assert "already used by" in items[1].error and items[1].slide_id != "s"


def test_csv_without_path_column(tmp_path):
    lst = tmp_path / "bad.csv"
    lst.write_text("file\na.svs\n")
    (item,) = expand_slide_inputs([str(lst)])
    assert "'path' column" in item.error


def test_slide_ids_are_safe_names():
    assert slide_id_for("/x/TCGA-01 (copy).svs") == "TCGA-01__copy_"
    assert slide_id_for("a.ome.tiff") == "a.ome"
