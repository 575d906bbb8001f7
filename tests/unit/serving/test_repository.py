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


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_publish_records_every_file_and_promote_refuses_a_changed_file_naming_it(staged, tmp_path):
    """lineage.json's ``files`` holds the sha256 of every file of the version; a truncated model.onnx (or any
    changed, missing or added file) refuses promote and rollback, naming the file; nothing switches."""
    from pipeline_lib.serving.repository import IntegrityError

    repo = tmp_path / "repo"
    v1, v2 = _publish(staged, repo, 1), _publish(staged, repo, 2)
    files = json.loads((v1 / "lineage.json").read_text())["files"]
    on_disk = {str(p.relative_to(v1)) for p in v1.rglob("*") if p.is_file()} - {"lineage.json"}
    assert set(files) == on_disk and "model.py" in files and "model_config.pbtxt" in files
    assert all(d.startswith("sha256:") for d in files.values())
    assert repository.verify_version(repo, "recsys", 1) is True
    repository.promote(repo, "recsys", 1)
    onnx = next(v2.rglob("model.onnx"))
    _truncate(onnx)
    rel = str(onnx.relative_to(v2))
    with pytest.raises(IntegrityError, match=rf"promote refused: version 2 .* file '{rel}' does not match its "
                                             rf"fingerprint in lineage.json.*nothing changed: version 1 is served"):
        repository.promote(repo, "recsys", 2)
    assert repository.served_version(repo, "recsys") == 1
    # the same for rollback: v3 served, v2 (corrupt) is the one it would go back to
    _publish(staged, repo, 3)
    repository.promote(repo, "recsys", 3)
    with pytest.raises(IntegrityError, match=rf"rollback refused: .* file '{rel}'.*version 3 is served"):
        repository.rollback(repo, "recsys")
    assert repository.served_version(repo, "recsys") == 3
    # a missing file and an added one are refused too; __pycache__ (the python backend's) is not a change
    (v1 / "__pycache__").mkdir()
    (v1 / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    assert repository.verify_version(repo, "recsys", 1)
    (v1 / "extra.py").write_text("print('not published')\n")
    with pytest.raises(IntegrityError, match=r"file 'extra.py' was added after publish"):
        repository.promote(repo, "recsys", 1)
    (v1 / "extra.py").unlink()
    (v1 / "model.py").unlink()
    with pytest.raises(IntegrityError, match=r"file 'model.py' is missing"):
        repository.promote(repo, "recsys", 1)
    history = [json.loads(line) for line in (repo / "recsys" / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["version"]) for h in history] == [("promote", 1), ("promote", 3)]


def test_a_version_published_before_fingerprints_were_recorded_still_promotes(staged, tmp_path):
    repo = tmp_path / "repo"
    v1 = _publish(staged, repo, 1, created="old")
    lin = json.loads((v1 / "lineage.json").read_text())
    del lin["files"]
    (v1 / "lineage.json").write_text(json.dumps(lin))
    assert repository.verify_version(repo, "recsys", 1) is False
    assert repository.promote(repo, "recsys", 1)["version"] == 1


def test_promote_is_all_or_nothing_when_the_history_cannot_be_written(staged, tmp_path):
    """history.jsonl unwritable before the switch (a directory in its place: root ignores file modes) refuses
    the promotion with nothing changed; a write that fails after the switch (history.jsonl -> /dev/full:
    open succeeds, the write fails with ENOSPC) puts the previous pin back. Each message says what is served."""
    repo = tmp_path / "repo"
    for v in (1, 2):
        _publish(staged, repo, v)
    repository.promote(repo, "recsys", 1)
    cfg_before = (repo / "recsys" / "config.pbtxt").read_text()
    hist = repo / "recsys" / "history.jsonl"
    hist.rename(tmp_path / "history.saved")
    hist.mkdir()
    with pytest.raises(RepositoryError, match=r"promote of version 2 refused: cannot write .*history.jsonl .*"
                                              r"nothing changed: version 1 is served"):
        repository.promote(repo, "recsys", 2)
    assert repository.served_version(repo, "recsys") == 1
    hist.rmdir()
    hist.symlink_to("/dev/full")
    with pytest.raises(RepositoryError, match=r"promote of version 2 undone: writing .*history.jsonl failed after the "
                                              r"switch .*No space left.*the previous pin was put back: version 1 is served"):
        repository.promote(repo, "recsys", 2)
    assert repository.served_version(repo, "recsys") == 1
    assert (repo / "recsys" / "config.pbtxt").read_text() == cfg_before
    # first promotion ever: the config written is removed again (nothing served, as before)
    fresh = tmp_path / "fresh"
    _publish(staged, fresh, 1)
    (fresh / "recsys" / "history.jsonl").symlink_to("/dev/full")
    with pytest.raises(RepositoryError, match=r"undone: .*nothing is served"):
        repository.promote(fresh, "recsys", 1)
    assert repository.served_version(fresh, "recsys") is None and not (fresh / "recsys" / "config.pbtxt").exists()


def _pickle_globals(data: bytes) -> set[str]:
    """``module:name`` of every global a pickle references (GLOBAL, and STACK_GLOBAL's two strings before it)."""
    import pickletools

    refs, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            refs.add(arg.replace(" ", ":"))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            refs.add(f"{strings[-2]}:{strings[-1]}")
    return refs


def test_a_versions_pickles_reference_only_recorded_project_names(staged):
    """Every project class a version's pickles (ensemble, workflow, compiled plan) reference is recorded in
    tests/fixtures/served_api.txt and resolves: a refactor moving one fails here, not in production."""
    from tests.unit.serving.test_served_api import recorded_api, resolves

    pickles = [p for p in staged.version_dir.rglob("*") if p.is_file() and p.suffix in (".pkl", ".pickle")]
    assert pickles, "no pickle in the version: the check would prove nothing"
    used = set()
    for p in pickles:
        used |= {r for r in _pickle_globals(p.read_bytes()) if r.startswith("pipeline_lib")}
    unrecorded = sorted(used - recorded_api())
    assert not unrecorded, f"record these in tests/fixtures/served_api.txt: {unrecorded}"
    assert all(resolves(r) for r in used)
