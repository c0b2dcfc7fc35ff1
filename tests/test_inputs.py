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


def test_same_file_twice_is_a_duplicate_row_and_id_clash_is_reported(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "s.svs").write_bytes(b"1")
    (tmp_path / "y" / "s.svs").write_bytes(b"2")
    items = expand_slide_inputs([str(tmp_path / "x" / "s.svs"), str(tmp_path / "x" / "s.svs"),
                                 str(tmp_path / "y" / "s.svs")])
    assert len(items) == 3, "every name given is an input"
    assert items[0].error is None and items[0].duplicate_of is None
    assert items[1].duplicate_of == "s" and items[1].slide_id == "s@1" and items[1].error is None
    assert str(tmp_path / "x" / "s.svs") in items[1].note and "processed once" in items[1].note
    assert "already used by" in items[2].error and items[2].slide_id == "s@2"


def test_links_folder_and_glob_naming_one_file(tmp_path):
    """Links under other names are slides of their own ids (with a note); a file reached again
    under the same id (folder + glob, a same-named link elsewhere, a hard link) repeats its row."""
    real = tmp_path / "store" / "a.svs"
    real.parent.mkdir()
    real.write_bytes(b"1")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "a.svs").symlink_to(real)
    (cohort / "b.svs").symlink_to(real)
    (cohort / "c.svs").hardlink_to(real)
    (tmp_path / "missing.svs").symlink_to(tmp_path / "gone.svs")  # a dangling link is a missing file
    items = expand_slide_inputs([str(cohort), str(cohort / "*.svs"), str(real), str(tmp_path / "missing.svs"),
                                 str(tmp_path / "missing.svs")])
    got = [(i.slide_id, i.duplicate_of, i.error is None) for i in items]
    assert got == [("a", None, True), ("b", None, True), ("c", None, True),  # the folder
                   ("a@3", "a", True), ("b@4", "b", True), ("c@5", "c", True),  # the glob: same ids again
                   ("a@6", "a", True),  # the link's target under the same id
                   ("missing", None, False), ("missing@8", "missing", True)]
    assert "the same file as" in items[1].note and "slide 'a'" in items[1].note
    assert items[0].note is None
    assert len({i.slide_id for i in items}) == len(items)


def test_csv_without_path_column(tmp_path):
    lst = tmp_path / "bad.csv"
    lst.write_text("file\na.svs\n")
    (item,) = expand_slide_inputs([str(lst)])
    assert "'path' column" in item.error


def test_slide_ids_are_safe_names():
    assert slide_id_for("/x/TCGA-01 (copy).svs") == "TCGA-01__copy_"
    assert slide_id_for("a.ome.tiff") == "a.ome"


def test_64_links_to_one_slide_are_64_inputs(real_slide, tmp_path):
    for i in range(64):
        (tmp_path / f"L{i:02d}.svs").symlink_to(real_slide)
    items = expand_slide_inputs([str(tmp_path)])
    assert [i.slide_id for i in items] == [f"L{i:02d}" for i in range(64)]
    assert all(i.error is None and i.duplicate_of is None for i in items)
    assert all("(slide 'L00')" in i.note for i in items[1:])
