"""Versioned repository: publish, pin/serve, rollback, retention, lineage (file-level, no server)."""
import json

import pytest

from pipeline_lib.export import ranking as export
from pipeline_lib.serving import repository
from pipeline_lib.serving.repository import RepositoryError


@pytest.fixture(scope="module")
def staged(trained, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staged") / "ensemble"
    return export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, trained.valid_rows(16),
                                  "click", staging, "recsys", 1)


def _publish(staged, repo, v, **lineage):
    version, path = repository.publish(staged.version_dir, staged.config_path, repo, "recsys", lineage)
    assert version == v
    return path


def test_publish_adds_a_version_without_changing_what_is_served(staged, tmp_path):
    repo = tmp_path / "repo"
    assert repository.served_version(repo, "recsys") is None and repository.next_version(repo, "recsys") == 1
    final = _publish(staged, repo, 1, created="t1")
    assert final == repo / "recsys" / "1" and (final / "model_config.pbtxt").exists()
    assert json.loads((final / "lineage.json").read_text())["created"] == "t1"
    assert json.loads((final / "lineage.json").read_text())["version"] == 1
    assert repository.served_version(repo, "recsys") is None  # published, not promoted
    assert sorted(p.name for p in (repo / "recsys").iterdir()) == [".lock", "1"]  # no half-copied leftovers


def test_promote_pins_the_version_in_tritons_config_and_rollback_goes_back(staged, tmp_path):
    repo = tmp_path / "repo"
    for v in (1, 2, 3):
        _publish(staged, repo, v)
    repository.promote(repo, "recsys", 2, instance_count=3)
    cfg = (repo / "recsys" / "config.pbtxt").read_text()
    assert "specific" in cfg and "versions: 2" in cfg and "count: 3" in cfg
    assert repository.served_version(repo, "recsys") == 2
    ev = repository.rollback(repo, "recsys")
    assert (ev["action"], ev["version"], ev["previous"]) == ("rollback", 1, 2)
    assert repository.served_version(repo, "recsys") == 1
    with pytest.raises(RepositoryError, match="no version older than 1"):
        repository.rollback(repo, "recsys")
    with pytest.raises(RepositoryError, match="version 9 .* not found"):
        repository.promote(repo, "recsys", 9)
    history = [json.loads(line) for line in (repo / "recsys" / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["version"]) for h in history] == [("promote", 2), ("rollback", 1)]


def test_prune_keeps_the_newest_and_the_served_version(staged, tmp_path):
    repo = tmp_path / "repo"
    for v in range(1, 6):
        _publish(staged, repo, v)
    repository.promote(repo, "recsys", 2)
    assert repository.prune(repo, "recsys", keep=2) == [1, 3]
    assert repository.list_versions(repo, "recsys") == [2, 4, 5]
    assert [p.name for p in (repo / "recsys").iterdir() if p.name.startswith(".")] == [".lock"]
    rows = repository.describe(repo, "recsys")
    assert [(r["version"], r["served"]) for r in rows] == [(2, True), (4, False), (5, False)]
    with pytest.raises(ValueError):
        repository.prune(repo, "recsys", keep=0)


def test_concurrent_publishes_get_distinct_versions(staged, tmp_path):
    """Two runs publishing at once (threads here; the lock is an OS file lock) never collide."""
    import threading

    repo = tmp_path / "repo"
    results, errors = [], []

    def worker():
        try:
            results.append(repository.publish(staged.version_dir, staged.config_path, repo, "recsys", {})[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(results) == [1, 2, 3, 4]
    for v in results:
        assert (repo / "recsys" / str(v) / "ensemble" / "ensemble.pkl").exists()
