"""The demo's reset of dagster_home keeps every file the project ships there."""

from harness.local_instance import SHIPPED_HOME_FILES, reset_dagster_home


def test_reset_keeps_the_shipped_settings_and_removes_the_history(tmp_path):
    # failed before: the demo deleted the tracked dagster_home/dagster-postgres.yaml
    for name in SHIPPED_HOME_FILES:
        (tmp_path / name).write_text(name)
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "runs.db").write_text("x")
    (tmp_path / "schedules.db").write_text("x")
    reset_dagster_home(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHIPPED_HOME_FILES)
    assert (tmp_path / "dagster-postgres.yaml").read_text() == "dagster-postgres.yaml"
