"""Export compressed models in formats that run outside LayerLab (plain transformers folders, GGUF files)."""
