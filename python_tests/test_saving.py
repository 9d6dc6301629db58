import os

import pytest

from upsafe_ext.saving import atomic_dir, check_not_input


def test_atomic_dir_writes_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write("new")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_atomic_dir_keeps_old_folder_on_error(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_replaces_existing_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_refuses_to_write_over_an_input(tmp_path, where):
    src = tmp_path / "in"
    src.mkdir()
    out = {"same": src, "inside": src / "sub", "parent": tmp_path}[where]
    with pytest.raises(ValueError, match="`out_dir`.*would overwrite the input"):
        check_not_input(out, [src], arg="out_dir")
    check_not_input(tmp_path / "other", [src, "HuggingFaceTB/not-a-folder"])  # unrelated and hub ids: fine


def test_atomic_file_replaces_only_on_success_and_sets_mode(tmp_path):
    from upsafe_ext.saving import atomic_file

    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with atomic_file(path, mode=0o600) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o600
