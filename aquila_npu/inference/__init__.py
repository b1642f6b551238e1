"""Running a built model: pipeline-parallel forward passes (generation and evaluation build on it)."""
