"""A local fake of the Hugging Face Hub for offline tests of loading Hub ids."""

import shutil
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

COMMITS = {"main": "1" * 40, "v1": "2" * 40}  # revision -> the commit it points at


class FakeHub:
    """`huggingface_hub.snapshot_download` over local folders: `publish` puts a folder at a
    revision; a download copies the files the library's own pattern filter lets through into a
    cache laid out like the real one (`<repo>/snapshots/<commit>`), and is recorded in `calls`."""

    def __init__(self, cache: Path):
        self.cache, self.repos, self.calls = cache, {}, []

    def publish(self, repo_id: str, folder: Path, revision: str = "main") -> None:
        self.repos.setdefault(repo_id, {})[revision] = Path(folder)

    def snapshot(self, repo_id: str, revision: str = "main") -> Path:
        return self.cache / repo_id.replace("/", "--") / "snapshots" / COMMITS[revision]

    def snapshot_download(self, repo_id, *, revision=None, token=None, allow_patterns=None):
        self.calls.append({"repo": repo_id, "revision": revision, "token": token,
                           "allow_patterns": list(allow_patterns)})
        by_commit = {COMMITS[r]: r for r in self.repos.get(repo_id, {})}
        name = by_commit.get(revision, revision or "main")
        if name not in self.repos.get(repo_id, {}):
            raise OSError(f"404 Client Error: {repo_id}@{name} not found")
        source, snapshot = self.repos[repo_id][name], self.snapshot(repo_id, name)
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for f in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / f, snapshot / f)
        return str(snapshot)


def install(cache: Path, monkeypatch) -> FakeHub:
    """A FakeHub in place of `huggingface_hub.snapshot_download` for one test."""
    fake = FakeHub(cache)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake.snapshot_download)
    return fake


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
