"""Layer-wise quantization: the grid and RTN, GPTQ, bit allocations, model wiring, cache, files, sizes."""
