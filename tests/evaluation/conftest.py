import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """cityscapesscripts' instance evaluation writes "matches.json" into the working
    directory; keep it out of the repository."""
    monkeypatch.chdir(tmp_path)
