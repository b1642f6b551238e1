"""Benchmark evaluation of a loaded model: a registry of tasks (``tasks``), each scoring its documents through a
``Scorer`` (``scoring``: log-likelihoods and next-token log-probabilities, lm-evaluation-harness conventions)."""
