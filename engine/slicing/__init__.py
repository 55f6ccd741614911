"""SliceGPT with constant, LR-dynamic or custom schedules: rotation math, sliced layers, the procedure."""
