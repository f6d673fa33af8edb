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
    assert main(["--root", root, "search", str(query), "-k", "0"]) == 2
    assert "-k must be in 1..1000, got 0" in capsys.readouterr().err
    assert main(["--root", root, "sample", "--images", "2", "--shards", "3"]) == 2
    assert "need 1 <= shards <= images" in capsys.readouterr().err


def test_searching_with_a_non_image_names_the_file(registered, tmp_path, capsys):
    from backfill.config import EmbedConfig, IndexConfig
    from backfill.embed import embed_shard
    from backfill.index import build_index
    from backfill.manifest import list_shards
    from backfill.publish import publish
    from backfill.runtime import load_model

    layout, card = registered
    model = load_model(layout, card)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, EmbedConfig(torch_threads=1))
    publish(layout, "refcnn", build_index(layout, "refcnn", "v1", list_shards(layout), IndexConfig()).build_id)
    query = tmp_path / "notes.jpg"
    query.write_text("not a picture")
    assert main(["--root", layout.store.root, "search", str(query)]) == 2
    assert f"query {query}: not an image" in capsys.readouterr().err


def test_serve_applies_the_cpu_budget_before_serving(tmp_path, monkeypatch):
    from backfill import service
    from backfill.pipeline import ThreadBudget

    calls = []
    monkeypatch.setattr(ThreadBudget, "apply", lambda self: calls.append(("budget", self.cpus)) or self)
    monkeypatch.setattr(service, "serve", lambda searcher, host, port, config: calls.append(("serve", config)))
    assert main(["--root", str(tmp_path), "serve"]) == 0
    assert [c[0] for c in calls] == ["budget", "serve"]
    assert calls[1][1] == service.ServiceConfig()  # the flags' defaults are the service's own
