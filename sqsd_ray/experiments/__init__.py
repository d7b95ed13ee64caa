"""Experiments (paper §5): risk bands from scores, S1–S5 fine-tunes and their safety metrics, and the mitigate
comparison.
"""
