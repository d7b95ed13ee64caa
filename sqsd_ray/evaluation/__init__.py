"""Safety metrics: generation, judges (keyword and model), and the evaluation job on Ray Data."""
