"""lit_lora.staging on a real filesystem: a staged folder is published whole or not at all, and never
leaves its temporary folder behind."""

from __future__ import annotations

import os
import stat

import pytest

from lit_lora import staging
from lit_lora.staging import scratch_folder, staged_folder, write_text_atomic
from tests.helpers import import_graph


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_success_publishes_the_folder_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "new" / "out"  # the parent is created
    with staged_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.")
        assert not target.exists(), "nothing under the final name before the body ends"
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert (target / "sub" / "a.txt").read_text() == "a"
    assert _names(target.parent) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_leaves_the_target_absent_and_no_temporary_folder(tmp_path, error):
    target = tmp_path / "out"
    with pytest.raises(error), staged_folder(target, mode=0o755) as tmp:
        (tmp / "half.txt").write_text("half")
        raise error
    assert _names(tmp_path) == []


def test_an_exception_leaves_an_existing_target_unchanged(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_replace_swaps_a_non_empty_folder_and_drops_the_old_one(tmp_path):
    target = tmp_path / "last.ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_folder(target, replace=True, prefix=".tmp-last.ckpt-") as tmp:
        assert tmp.name.startswith(".tmp-last.ckpt-")
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["new.txt"]
    assert _names(tmp_path) == ["last.ckpt"], "no .old or temporary folder left"


def test_replace_puts_the_old_folder_back_when_the_new_one_cannot_be_renamed_in(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if not str(src).endswith(".old") and str(dst) == str(target):
            raise OSError("simulated failure of the second rename")
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"), staged_folder(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_without_replace_an_empty_folder_is_replaced_and_a_full_one_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_folder(empty) as tmp:
        (tmp / "a.txt").write_text("a")
    assert _names(empty) == ["a.txt"]

    full = tmp_path / "full"
    full.mkdir()
    (full / "theirs.txt").write_text("theirs")
    with pytest.raises(OSError), staged_folder(full) as tmp:
        (tmp / "ours.txt").write_text("ours")
    assert _names(full) == ["theirs.txt"] and _names(tmp_path) == ["empty", "full"]


def test_a_complete_folder_published_meanwhile_by_another_process_is_kept(tmp_path):
    target = tmp_path / "model"
    with staged_folder(target, keep_if_has="marker.json") as tmp:
        (tmp / "weights").write_text("ours")
        (tmp / "marker.json").write_text("{}")
        target.mkdir()  # the other process wins the race
        (target / "weights").write_text("theirs")
        (target / "marker.json").write_text("{}")
    assert (target / "weights").read_text() == "theirs"
    assert _names(tmp_path) == ["model"], "our temporary folder is gone"


def test_an_incomplete_folder_published_meanwhile_is_an_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(OSError), staged_folder(target, keep_if_has="marker.json") as tmp:
        (tmp / "marker.json").write_text("{}")
        target.mkdir()
        (target / "weights").write_text("theirs, without a marker")
    assert _names(target) == ["weights"] and _names(tmp_path) == ["model"]


def test_mode_sets_the_published_permissions_and_none_keeps_the_umask_default(tmp_path):
    for name, mode in (("public", 0o755), ("private", 0o700)):
        with staged_folder(tmp_path / name, mode=mode) as tmp:
            assert _mode(tmp) == 0o700 & ~_umask(), "private while it is written"
        assert _mode(tmp_path / name) == mode
    with staged_folder(tmp_path / "default"):
        pass
    assert _mode(tmp_path / "default") == 0o777 & ~_umask()


def test_scratch_folder_is_removed_on_exit(tmp_path):
    with scratch_folder(tmp_path / "parent", ".x.") as tmp:
        (tmp / "f").write_text("f")
        assert tmp.parent == tmp_path / "parent" and tmp.name.startswith(".x.")
    assert _names(tmp_path / "parent") == []
    with pytest.raises(RuntimeError), scratch_folder(tmp_path, ".y.") as tmp:
        raise RuntimeError
    assert _names(tmp_path) == ["parent"]


def test_write_text_atomic_replaces_a_file_with_the_given_mode(tmp_path):
    path = tmp_path / "marker.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o644
    assert _names(tmp_path) == ["marker.json"]


def test_staging_is_a_leaf_of_lit_lora():
    assert import_graph()["staging"] <= {"errors"}
