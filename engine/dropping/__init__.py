"""Layer dropping (docs/methods.md §8): remove whole decoder layers, or only their attention or MLP blocks."""
