"""Lineage fingerprints: the ETL cache key's code part, and what each family actually saved."""
import shutil

from pipeline_lib.release import lineage
from tests.support import ROOT


def test_etl_code_fingerprint_changes_with_an_uncommitted_edit_of_the_etl_code(tmp_path):
    """The ETL cache key hashes the ETL's source files and package versions, not ``git rev-parse HEAD``:
    a copy without .git gives the same key, and editing one ETL source file changes it."""
    copy = tmp_path / "pipeline_lib"
    for sub in lineage.ETL_CODE:
        shutil.copytree(ROOT / "pipeline_lib" / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    assert lineage.etl_code_fingerprint(copy) == lineage.etl_code_fingerprint()
    f = copy / "etl" / "workflow.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    edited = lineage.etl_code_fingerprint(copy)
    assert edited != lineage.etl_code_fingerprint()
    (copy / "data" / "new_source.py").write_text("X = 1\n")  # a new file counts too
    assert lineage.etl_code_fingerprint(copy) != edited


def test_etl_code_fingerprint_includes_the_versions_of_the_packages_that_produce_the_output(tmp_path, monkeypatch):
    from importlib import metadata

    real = metadata.version
    before = lineage.etl_code_fingerprint()
    monkeypatch.setattr(metadata, "version", lambda name: "0.0-other" if name == "nvtabular" else real(name))
    assert lineage.etl_code_fingerprint() != before
    assert {"nvtabular", "merlin-core", "pandas", "pyarrow", "numpy"} <= set(lineage.ETL_PACKAGES)


def test_model_fingerprint_covers_every_file_the_family_saved(tmp_path):
    """A two-tower model saves query_encoder/ and item_encoder/, no top-level saved_model.pb: the lineage
    fingerprint is of every file it saved (it changes when any does), and a re-ranker is fingerprinted too."""
    raw = tmp_path / "raw.parquet"
    raw.write_bytes(b"rows")
    wf = tmp_path / "workflow"
    wf.mkdir()
    (wf / "workflow.pkl").write_bytes(b"wf")
    model = tmp_path / "model"
    for sub in ("query_encoder", "item_encoder"):
        (model / sub / "variables").mkdir(parents=True)
        (model / sub / "saved_model.pb").write_bytes(sub.encode())
        (model / sub / "variables" / "variables.data-00000-of-00001").write_bytes(b"w-" + sub.encode())
    ranker = tmp_path / "ranker"
    ranker.mkdir()
    (ranker / "saved_model.pb").write_bytes(b"r")
    info = lineage.build_lineage(tmp_path, raw, {}, wf, model, {}, {"ranker": ranker})
    assert set(info["model"]["files"]) == {"query_encoder/saved_model.pb", "item_encoder/saved_model.pb",
                                           "query_encoder/variables/variables.data-00000-of-00001",
                                           "item_encoder/variables/variables.data-00000-of-00001"}
    assert info["ranker"]["files"] == {"saved_model.pb": lineage.file_fingerprint(ranker / "saved_model.pb")}
    assert info["etl_code"] == lineage.etl_code_fingerprint()
    (model / "item_encoder" / "variables" / "variables.data-00000-of-00001").write_bytes(b"retrained")
    again = lineage.build_lineage(tmp_path, raw, {}, wf, model, {})
    assert again["model"]["fingerprint"] != info["model"]["fingerprint"]
