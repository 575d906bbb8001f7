"""The shared small run exported once with the default options, for the export stage's unit tests."""
import pytest

from pipeline_lib.export import ranking as export


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    staging = tmp_path_factory.mktemp("export") / "ensemble"
    rows = trained.valid_rows(64)
    out = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                 staging, "recsys", 1, export.ExportOptions(run_info={"run": "test"}))
    return out, rows
