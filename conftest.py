"""Pytest setup for every run in this repository: the unit tests (``tests/``) and the notebooks that
nbval executes (``make test`` passes ``notebooks/*.ipynb``; its second-model run passes one notebook
alone, which is why this file sits at the root and not in ``tests/``)."""

from __future__ import annotations

NBVAL_OUTPUT_TIMEOUT_S = 120
"""Seconds nbval waits for each of a cell's output messages after the kernel reports the cell done.

nbval 0.11 fixes it at 5 s (``IPyNbCell.output_timeout``; no option sets it — nbval issues #136 and
#231). On a loaded 2-core CI machine a long training cell's last outputs have once taken longer, and the
notebook failed with "Timeout of 5 seconds exceeded waiting for output" although the cell had run. A
longer wait only slows a run in which the kernel really stopped answering; ``--nbval-cell-timeout`` still
bounds how long a cell may run."""


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if type(item).__module__.startswith("nbval") and hasattr(item, "output_timeout"):  # nbval's IPyNbCell
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
