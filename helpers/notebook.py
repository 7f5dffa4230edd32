"""What every study notebook does at its start and at its end.

Start::

    from helpers.notebook import start
    run = start("02_ioi_circuit", paper_model="gpt2", seed=0)
    # prints: profile, model, the model switch MI_MODEL, device, seed (the notebook's first output)
    N_PROMPTS = run.choose(paper=100, embedded=64, ci=16)
    model = run.load_model()

End::

    table = run.results_table()
    table.add("mean logit difference", paper=3.56, this_run=ld, note="GPT-2 small, 100k prompts")
    table.show()   # displays the "paper vs. this run" table and writes figures/results/<notebook>.{md,json}

``make reproduce`` collects the written tables into ``figures/RESULTS.md``. With ``MI_MODEL`` naming a
model other than the default (``embedded``/``ci`` profiles), every output goes under
``figures/<model>/`` instead (:func:`helpers.profiles.output_subdir`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from helpers.models import best_device, display_name, load_model
from helpers.plotting import figures_dir, save_figure, show
from helpers.profiles import MODEL_ENV_VAR, Profile, get_embedded_model, get_profile, output_subdir


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class Run:
    """The context of one notebook run: profile, model name, device, seed, output folder."""

    notebook: str
    profile: Profile
    model_name: str
    model_description: str
    device: str
    seed: int
    embedded_model: str | None = None
    """The ``MI_MODEL`` choice of an ``embedded``/``ci`` run (``"smollm2"``, ``"gemma-3-270m"``); ``None`` in
    the ``paper`` profile."""

    def choose(self, *, paper: Any, embedded: Any, ci: Any) -> Any:
        """The value for the active profile (see :meth:`helpers.profiles.Profile.choose`)."""
        return self.profile.choose(paper=paper, embedded=embedded, ci=ci)

    def load_model(self, **kwargs: Any) -> Any:
        """:func:`helpers.models.load_model` for this run's model and device."""
        kwargs.setdefault("device", self.device)
        return load_model(self.model_name, **kwargs)

    def show(self, fig: Any, name: str) -> None:
        """Display ``fig`` (interactive + PNG) and save it as ``<notebook>/<name>`` in the figures dir."""
        show(fig, f"{self.notebook}/{name}")

    def save(self, fig: Any, name: str) -> None:
        save_figure(fig, f"{self.notebook}/{name}")

    def results_table(self) -> "ResultsTable":
        return ResultsTable(self)

    @property
    def model_switch(self) -> str:
        """What the header prints for ``MI_MODEL``."""
        if self.embedded_model is None:
            return f"not used in the {self.profile.name} profile"
        choice = get_embedded_model(self.embedded_model)
        if choice.is_default:
            return f"{choice.name} (default)"
        subdir = output_subdir(self.profile, choice)
        return f"{choice.name} (outputs under figures/{subdir}/)" if subdir else choice.name

    def header(self) -> str:
        return (
            f"notebook: {self.notebook}\n"
            f"profile:  {self.profile.name}\n"
            f"model:    {self.model_description}\n"
            f"{MODEL_ENV_VAR}: {self.model_switch}\n"
            f"device:   {self.device}\n"
            f"seed:     {self.seed}"
        )


def start(
    notebook: str,
    *,
    paper_model: str | None,
    seed: int = 0,
    embedded_model: str | None = None,
    model_description: str | None = None,
    profile: str | None = None,
) -> Run:
    """Resolve the profile and the model switch, pick the model name, seed everything and print the
    run's header.

    Args:
        notebook: the notebook's file stem (``"02_ioi_circuit"``); names its figures folder.
        paper_model: the model of the ``paper`` profile (``None`` for studies that train their own).
        seed: the global seed.
        embedded_model: the model of the ``embedded``/``ci`` profiles, a :data:`helpers.profiles.EMBEDDED_MODELS`
            name; ``None`` (default) reads ``MI_MODEL`` (SmolLM2 when unset). Where outputs go always
            follows ``MI_MODEL``.
        model_description: what to print as the model (defaults to a description of the name).
        profile: override ``MI_PROFILE`` (mostly for tests).

    Raises:
        ProfileError / ModelChoiceError: ``MI_PROFILE`` / ``MI_MODEL`` (or the arguments) name no
            profile / model; the message lists the choices.
    """
    active = get_profile(profile)
    choice = get_embedded_model(embedded_model) if active.uses_embedded_model else None
    offline = choice.load_name if choice is not None else None
    name = active.choose(paper=paper_model, embedded=offline, ci=offline)
    if model_description is None:
        model_description = display_name(str(name))
    seed_everything(seed)
    run = Run(notebook, active, name, model_description, best_device(), seed,
              choice.name if choice is not None else None)
    print(run.header())
    return run


# --------------------------------------------------------------------------------------------------
# "Paper vs. this run"
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


@dataclass
class ResultsTable:
    """The closing "paper vs. this run" table of a notebook."""

    run: Run
    rows: list[dict[str, str]] = field(default_factory=list)

    def add(self, quantity: str, *, paper: Any, this_run: Any, note: str = "") -> "ResultsTable":
        self.rows.append({"quantity": quantity, "paper": _fmt(paper), "this_run": _fmt(this_run), "note": note})
        return self

    def to_markdown(self) -> str:
        lines = [
            f"profile `{self.run.profile.name}` · model {self.run.model_description} · device {self.run.device} · seed {self.run.seed}",
            "",
            "| quantity | paper | this run | note |",
            "|---|---|---|---|",
        ]
        for row in self.rows:
            cells = [row[k].replace("|", "\\|").replace("\n", " ") for k in ("quantity", "paper", "this_run", "note")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def show(self) -> None:
        """Display the table and write ``results/<notebook>.md`` and ``.json`` in the figures dir."""
        from IPython.display import Markdown, display

        markdown = self.to_markdown()
        display(Markdown(markdown))
        folder = figures_dir() / "results"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.run.notebook}.md").write_text(markdown + "\n", encoding="utf-8")
        payload = {
            "notebook": self.run.notebook,
            "profile": self.run.profile.name,
            "model": self.run.model_description,
            "device": self.run.device,
            "seed": self.run.seed,
            "mi_model": self.run.embedded_model,
            "rows": self.rows,
        }
        (folder / f"{self.run.notebook}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
