"""Activation patching and path patching on :class:`TransformerBridge` hooks — exact and fast.

Vocabulary (as in Heimersheim & Nanda, "How to use and interpret activation patching"):

* **clean** run: the prompts on which the model does the task (e.g. IOI prompts);
* **corrupted** run: the same prompts with the relevant information removed (e.g. other names);
* **denoising** (``direction="denoise"``, the default): run the *corrupted* prompts and patch in
  one activation from the *clean* run. A large metric means "this activation is sufficient to
  restore the behaviour";
* **noising** (``direction="noise"``): run the *clean* prompts and patch in one activation from the
  *corrupted* run. A large drop means "this activation is necessary".

Every sweep returns a :class:`LabelledTensor` whose values are ``metric(patched logits)``, one per
patched component; ``result.meta`` holds the metric on the unpatched clean and corrupted runs
(``clean_value``, ``corrupted_value``). Pass a normalised metric
(:func:`helpers.metrics.make_logit_diff_metric` with both baselines) to get 0 = corrupted,
1 = clean.

How it is fast, while staying exact
-----------------------------------
TransformerLens' ``transformer_lens.patching`` runs one full forward pass per patched component.
Here

1. the clean and corrupted runs are cached **once**, keeping only the hooks the sweep needs;
2. several patched runs share **one forward pass**: the prompts are repeated ``k`` times along the
   batch dimension and copy ``c`` patches component ``c``;
3. a patched run **starts at the patched layer** from the cached residual stream of the run being
   patched (nothing upstream of the patch can change), skipping the layers below it. (The bridge's
   own ``start_at_layer`` still executes the lower blocks and discards their output; we also make
   them pass their input straight through for the duration of the call — they stay in the layer
   list, which Gemma-2/3 index by position to pick each layer's attention mask.)
4. when the metric only reads each prompt's last real token (detected automatically, see
   ``logit_positions``), the unembedding is computed only there, and
5. positions before the first token where the clean and corrupted prompts differ are computed
   **once**: they are identical in both runs and no patch can change them (causal attention), so
   patched runs process only the suffix, reading the prefix's keys/values from the target run's
   KV cache. (This helps most when the corruption is late in the prompt; it is checked against the
   full run at setup and switched off for models whose attention ignores or cannot continue from
   the cache or that hand back no usable KV cache (none, or one without every position's keys) — with a :class:`SharedPrefixWarning`, a log line, and the reason in
   ``result.meta["shared_prefix_off"]``; ``result.meta["shared_prefix_positions"]`` is how many
   positions were skipped.)

Memory: each batched forward holds at most ``max_batch_tokens`` tokens; the default comes from one
memory budget scaled by the model's vocabulary (:func:`helpers.batching.max_batch_tokens`: about 2,200
tokens for SmolLM2, 490 for Gemma-3's 262k vocabulary). Lower it on small machines, raise it on a GPU.

The tests check every sweep against a naive one-forward-per-component loop and against
``transformer_lens.patching`` where it has the same sweep.

Grouped-query attention: the embedded model has 9 query heads but 3 key/value heads. Patching
``"q"``, ``"z"`` or ``"pattern"`` is per query head; patching ``"k"``/``"v"`` is per **key/value
head** (dimension ``"kv_head"``), which feeds ``n_heads / n_kv_heads`` query heads at once.

The package
-----------
* :mod:`helpers.patching.inputs` — the options (``Direction``, ``LogitPositions``),
  :func:`as_token_batch` and the input checks;
* :mod:`helpers.patching.engine` — the batched engine (``_Patcher``) and the edits a patched run applies;
* :mod:`helpers.patching.sweeps` — the sweeps (``patch_residual``, ``patch_heads``, ``patch_hook``, …);
* :mod:`helpers.patching.path_patching` — :func:`path_patch` and :func:`path_patch_senders`;
* the results type :class:`~helpers.labelled_tensor.LabelledTensor` is :mod:`helpers.labelled_tensor`'s
  (:mod:`helpers.attribution` returns it too).

Every public name is importable from ``helpers.patching`` itself.
"""

from __future__ import annotations

from helpers.labelled_tensor import LabelledTensor
from helpers.patching.engine import SharedPrefixWarning
from helpers.patching.inputs import Direction, LogitPositions, as_token_batch  # noqa: F401  (option types)
from helpers.patching.path_patching import Head, path_patch, path_patch_senders  # noqa: F401  (Head: a type)
from helpers.patching.sweeps import (
    patch_attn_out,
    patch_heads,
    patch_hook,
    patch_layer_outputs,
    patch_layer_window,
    patch_mlp_out,
    patch_residual,
)

__all__ = [
    "LabelledTensor",
    "patch_residual",
    "patch_attn_out",
    "patch_mlp_out",
    "patch_layer_outputs",
    "patch_heads",
    "patch_layer_window",
    "patch_hook",
    "path_patch",
    "path_patch_senders",
    "as_token_batch",
    "SharedPrefixWarning",
]
