"""Grokking modular addition (Nanda et al. 2023), notebook ``01_grokking_fourier_circuits``.

* :mod:`~helpers.studies.grokking.training` — the paper's config, data split and one-layer model, the fast
  batched training loop, checkpoints, and the model as a ``TransformerBridge``;
* :mod:`~helpers.studies.grokking.fourier` — Fourier analysis of the trained model, the progress measures,
  the training phases, and the whole pipeline (:func:`~helpers.studies.grokking.fourier.train_and_measure`);
* :mod:`~helpers.studies.grokking.figures` — the notebook's plotly figures.

Nothing is imported here (each module imports what it needs).
"""
