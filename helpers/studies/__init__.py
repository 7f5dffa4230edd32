"""The code of the individual studies, one module or subpackage per notebook.

* :mod:`helpers.studies.grokking` — ``01_grokking_fourier_circuits`` (Nanda et al. 2023)
* :mod:`helpers.studies.ioi` — ``02_ioi_circuit`` (Wang et al. 2022)
* :mod:`helpers.studies.refusal` — ``03_refusal_direction`` (Arditi et al. 2024)
* :mod:`helpers.studies.entropy_neurons` — ``04_entropy_neurons`` (Stolfo et al. 2024)
* :mod:`helpers.studies.self_repair` — ``05_self_repair`` (Rushing & Nanda 2024)
* :mod:`helpers.studies.patching_practices` — ``06_activation_patching_best_practices`` (Zhang & Nanda 2024)
* :mod:`helpers.studies.sparse_autoencoders` — ``07_sparse_autoencoders`` (Paulo & Belrose 2025)

A study builds on the toolkit (``helpers.<module>``: profiles, models, prompts, metrics, patching,
ablation, effects, attribution, plotting, notebook, …); the toolkit never imports a study. Nothing is
imported here: ``import helpers.studies`` stays cheap.
"""
