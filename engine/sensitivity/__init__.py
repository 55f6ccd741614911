"""Measured per-layer sensitivity (docs/methods.md §6): what each action on one layer really costs.

Pure computation, no streamlit.  Modules, in the order data flows:

- ``errors``: the ValueError subclasses a user can cause (each says what to do).
- ``actions``: :class:`Action` (quantize, slice, drop a layer / its attention / its MLP), parsing, checks.
- ``cost``: per-token costs of layers and head; forward-equivalent counts and estimates.
- ``dense``: one dense pass that caches every layer's input, the layers' keyword
  arguments and the head's reference statistics (:class:`DenseReference`).
- ``layer_actions``: the modified copy / wrapper of one layer for one action.
- ``scan``: re-run layers i..L-1 and the head from the cached input of layer i
  (:func:`scan_action` -> :class:`ActionDamage`: KL and ΔNLL per layer).
- ``agreement``: Spearman (bootstrap interval over windows) and top-k overlap of
  every layer score against every measured damage.
- ``findings``: the one-line finding, written from the numbers.
- ``cached``: the store around it (per model fingerprint, data, windows, seqlen, action).
"""
