"""The results type of the toolkit's sweeps: a tensor whose dimensions have names and whose entries
have labels (:class:`LabelledTensor`). Returned by every :mod:`helpers.patching` sweep and by
:mod:`helpers.attribution`; the studies build their own from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LabelledTensor"]


@dataclass
class LabelledTensor:
    """A tensor of results whose dimensions have names and whose entries have labels.

    Attributes:
        values: the numbers, e.g. ``[layer, head]`` patching results (on CPU, detached).
        dims: one name per dimension, e.g. ``("layer", "head")``.
        labels: per dimension name, one label per index (layer numbers, ``"5: ' Mary'"`` positions,
            head numbers, …). Dimensions without labels get ``0, 1, …``.
        meta: anything else worth keeping with the numbers (baselines, what was patched, …).

    ``to_frame()`` gives a long pandas DataFrame; ``top(k)`` the k largest ``|value|`` entries with
    their labels; the plotting helpers take ``.values`` (and ``tick_labels(dim)`` for the axes).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).detach()
        self.dims = tuple(self.dims)
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"LabelledTensor: {len(self.dims)} dims {self.dims} for a {self.values.ndim}-d tensor.")
        labels = dict(self.labels)
        for axis, dim in enumerate(self.dims):
            size = self.values.shape[axis]
            if dim not in labels:
                labels[dim] = list(range(size))
            elif len(labels[dim]) != size:
                raise ValueError(f"LabelledTensor: dim {dim!r} has size {size} but {len(labels[dim])} labels.")
        self.labels = labels

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        what = f" {self.meta['what']!r}" if "what" in self.meta else ""
        return f"LabelledTensor({dims}){what}"

    def tick_labels(self, dim: str) -> list[str]:
        """The labels of ``dim`` as strings (for plot axes)."""
        return [str(label) for label in self.labels[dim]]

    def to_frame(self, value_name: str = "value"):
        """Long format: one row per entry, a column per dimension (its label) plus ``<dim>_index``."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.values.shape], indexing="ij")
        columns: dict[str, Any] = {}
        for dim, grid in zip(self.dims, grids):
            flat = grid.reshape(-1).tolist()
            columns[dim] = [self.labels[dim][i] for i in flat]
            columns[f"{dim}_index"] = flat
        columns[value_name] = self.values.reshape(-1).float().tolist()
        return pd.DataFrame(columns)

    def top(self, k: int = 10, *, largest_abs: bool = True):
        """The ``k`` entries with the largest ``|value|`` (or largest value), NaNs skipped."""
        frame = self.to_frame()
        frame = frame[frame["value"].notna()]
        key = frame["value"].abs() if largest_abs else frame["value"]
        return frame.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def plot(self, title: str = "", **kwargs: Any):
        """A heatmap (2-D: first dim on y, second on x) or a line (1-D) via :mod:`helpers.plotting`."""
        from helpers import plotting

        if self.values.ndim == 2:
            y_dim, x_dim = self.dims
            return plotting.heatmap(
                self.values, title=title, x_label=x_dim, y_label=y_dim,
                x_ticks=self.tick_labels(x_dim), y_ticks=self.tick_labels(y_dim), **kwargs,
            )
        if self.values.ndim == 1:
            return plotting.line({self.meta.get("what", "value"): self.values}, title=title,
                                 x=self.labels[self.dims[0]], **kwargs)
        raise ValueError(f"plot() draws 1-D or 2-D results; this one is {self.dims}. Index it first.")
