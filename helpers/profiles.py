"""Run profiles: one environment variable decides model and sizes, never the code path.

``MI_PROFILE`` selects one of three profiles:

* ``paper``    – the paper's model and data sizes (usually wants a GPU and network access for weights).
* ``embedded`` – the embedded SmolLM2-135M-Instruct model, full analysis, runs offline on a CPU.
* ``ci``       – the embedded model at the smallest sizes that still show each effect (what CI runs).

An interactive notebook with no ``MI_PROFILE`` set runs the ``paper`` profile; ``make reproduce``
sets ``embedded`` and ``make test`` sets ``ci``.

A notebook picks its sizes with :meth:`Profile.choose`, so every size it uses is visible in its
parameter cell::

    profile = get_profile()
    N_PROMPTS = profile.choose(paper=100, embedded=64, ci=16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, TypeVar

ENV_VAR = "MI_PROFILE"
PROFILE_NAMES: tuple[str, ...] = ("paper", "embedded", "ci")
DEFAULT_PROFILE = "paper"

ProfileName = Literal["paper", "embedded", "ci"]
T = TypeVar("T")


class ProfileError(ValueError):
    """An unknown profile name (from the argument or from ``MI_PROFILE``)."""


@dataclass(frozen=True)
class Profile:
    """The active run profile. Compare by name or use the ``is_*`` properties."""

    name: ProfileName

    @property
    def is_paper(self) -> bool:
        return self.name == "paper"

    @property
    def uses_embedded_model(self) -> bool:
        """True for ``embedded`` and ``ci``: the offline SmolLM2 model stands in for the paper's."""
        return self.name in ("embedded", "ci")

    def choose(self, *, paper: T, embedded: T, ci: T) -> T:
        """Return the value for the active profile. All three must be given, so no size is implicit."""
        return {"paper": paper, "embedded": embedded, "ci": ci}[self.name]

    def __str__(self) -> str:
        return self.name


def get_profile(name: str | None = None) -> Profile:
    """Resolve the run profile.

    Args:
        name: ``"paper"``, ``"embedded"`` or ``"ci"``. ``None`` reads the ``MI_PROFILE`` environment
            variable, and falls back to ``"paper"`` when it is unset or empty.

    Raises:
        ProfileError: the name is not one of the three profiles.
    """
    source = "argument `name`"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or DEFAULT_PROFILE
        source = f"environment variable {ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else "default"
    normalised = name.strip().lower()
    if normalised not in PROFILE_NAMES:
        raise ProfileError(
            f"Unknown run profile {name!r} (from {source}). Expected one of {', '.join(PROFILE_NAMES)}: "
            f"'paper' for the paper's model and sizes, 'embedded' for the offline SmolLM2 model, "
            f"'ci' for the smallest sizes. Set it with e.g. `export {ENV_VAR}=embedded` before "
            f"starting Jupyter, or `%env {ENV_VAR}=embedded` in the first cell."
        )
    return Profile(normalised)  # type: ignore[arg-type]
