import pytest

from backfill.cli import main


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("sample", "register", "search", "status", "evaluate"):
        assert command in out


def test_sample_register_status(tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["--root", root, "sample", "--images", "24", "--shards", "2"]) == 0
    assert "wrote 24 images" in capsys.readouterr().out
    assert main(["--root", root, "status"]) == 0
    out = capsys.readouterr().out
    assert "registry refcnn: no versions" in out and "refcnn: nothing published" in out


def test_errors_name_the_problem_and_exit_2(tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["--root", root, "register", "v7"]) == 2
    assert "no reference model 'v7' (have v1, v2)" in capsys.readouterr().err
    query = tmp_path / "q.jpg"
    query.write_bytes(b"whatever")
    assert main(["--root", root, "search", str(query)]) == 2
    assert "no index is published for model 'refcnn'" in capsys.readouterr().err
    assert main(["--root", root, "sample", "--images", "2", "--shards", "3"]) == 2
    assert "need 1 <= shards <= images" in capsys.readouterr().err
