"""fedcommon.run_folder: a run's folder layout and its delete-by-rename, shared by the server and the sites."""

from __future__ import annotations

import pytest

from fedcommon.atomic import atomic_write_json
from fedcommon.run_folder import RunFolder, RunFolderError, make_folders, remove, run_dir, set_aside


def test_the_layout_names_every_part_of_a_run_folder(tmp_path):
    folder = RunFolder.of(tmp_path, 3)
    assert folder.root == run_dir(tmp_path, 3) == tmp_path / "run_3"
    assert (folder.mmar, folder.models, folder.summary, folder.state) == (
        tmp_path / "run_3" / "mmar",
        tmp_path / "run_3" / "models",
        tmp_path / "run_3" / "summary.json",
        tmp_path / "run_3" / "state.json",
    )
    assert folder.worker_log == tmp_path / "run_3" / "logs" / "worker.log"
    assert folder.cross_site == tmp_path / "run_3" / "cross_site"
    assert folder.completed == tmp_path / "run_3" / "completed.json"
    assert not tmp_path.joinpath("run_3").exists(), "naming the paths creates nothing"


def test_a_run_is_deployed_when_its_mmar_folder_is_there(tmp_path):
    folder = RunFolder.of(tmp_path, 1)
    assert not folder.is_deployed()
    folder.mmar.mkdir(parents=True)
    assert folder.is_deployed()


@pytest.mark.parametrize("number", ["1", "../x", True, 1.0, None])
def test_a_run_number_that_is_not_a_whole_number_names_no_folder(tmp_path, number):
    with pytest.raises(TypeError, match="a run number is a whole number"):
        run_dir(tmp_path, number)


def test_set_aside_hides_the_run_at_once_and_remove_deletes_it(tmp_path):
    folder = RunFolder.of(tmp_path, 2)
    folder.models.mkdir(parents=True)
    (folder.models / "global_model.fl").write_bytes(b"x")
    trash = set_aside(tmp_path, 2)
    assert not folder.root.exists()
    assert trash.parent == tmp_path and trash.name.startswith(".deleted-run_2.")
    assert (trash / "models" / "global_model.fl").exists()
    remove(trash)
    assert list(tmp_path.iterdir()) == []


def test_set_aside_refuses_the_active_run_and_leaves_it(tmp_path):
    run_dir(tmp_path, 1).mkdir()
    with pytest.raises(RunFolderError, match="^run 1 is active; abort it first$"):
        set_aside(tmp_path, 1, active=1)
    assert run_dir(tmp_path, 1).is_dir()
    trash = set_aside(tmp_path, 1, active=2)  # another run training does not hold this one
    assert not run_dir(tmp_path, 1).exists() and trash.exists()


def test_set_aside_refuses_a_run_that_does_not_exist_naming_where_it_looked(tmp_path):
    with pytest.raises(RunFolderError, match=r"^run 4 does not exist \(.*run_4\)$"):
        set_aside(tmp_path, 4)


def test_removing_a_run_that_was_a_link_removes_the_link_not_what_it_points_at(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    ws = tmp_path / "ws"
    ws.mkdir()
    run_dir(ws, 1).symlink_to(outside)
    remove(set_aside(ws, 1))
    assert list(ws.iterdir()) == [] and (outside / "keep.txt").read_text() == "kept"


def test_make_folders_makes_what_is_missing_below_a_run_folder_but_never_the_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_2 does not exist"):
        make_folders(tmp_path / "ws" / "run_2" / "tensorboard" / "site-1")
    assert not (tmp_path / "ws").exists()
    set_up = tmp_path / "ws" / "run_2"
    set_up.mkdir(parents=True)
    make_folders(set_up / "tensorboard" / "site-1", 0o700)
    assert (set_up / "tensorboard" / "site-1").is_dir()
    assert (set_up / "tensorboard").stat().st_mode & 0o777 == 0o700
    make_folders(tmp_path / "other" / "logs")  # no run folder on the way: every level is made
    assert (tmp_path / "other" / "logs").is_dir()


def test_a_late_writer_of_a_deleted_run_fails_instead_of_bringing_the_run_back(tmp_path):
    folder = RunFolder.of(tmp_path, 2)
    folder.models.mkdir(parents=True)
    remove(set_aside(tmp_path, 2))
    with pytest.raises(FileNotFoundError, match="run_2 does not exist"):
        make_folders(folder.root / "tensorboard")
    with pytest.raises(FileNotFoundError, match="run_2 does not exist"):
        atomic_write_json(folder.summary, {"status": "aborted"})
    assert list(tmp_path.iterdir()) == []
