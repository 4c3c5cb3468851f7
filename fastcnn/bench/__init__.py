"""The benchmark runner behind `python -m fastcnn bench`."""
