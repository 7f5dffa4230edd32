"""Refusal is mediated by a single direction (Arditi et al. 2024), notebook ``03_refusal_direction``.

* :mod:`~helpers.studies.refusal.data` — the harmful/harmless request sets, their splits, the style-shift
  set and the data paths (``helpers/data/refusal``); no torch;
* :mod:`~helpers.studies.refusal.judges` — whether a completion refuses (substring judge, refusal
  patterns, judge tables); no torch;
* :mod:`~helpers.studies.refusal.direction` — the study: refusal scores, candidate directions, selection,
  interventions, generations, capability costs (re-exports the data and judge API it builds on);
* :mod:`~helpers.studies.refusal.safety_tuning` — the LoRA adapter that gives the embedded model its
  refusal behaviour (training data, training, loading the merged model).

``direction`` and ``safety_tuning`` both import ``data`` and ``judges``; ``direction`` imports
``safety_tuning`` (inside functions) but never the reverse. Nothing is imported here.
"""
