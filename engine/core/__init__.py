"""What everything stands on: architectures table, model loading, data windows, paths, progress, layer capture."""
