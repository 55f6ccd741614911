"""Per-layer scores: LR cosines (redundancy), ZD outliers (weights), ranks."""
