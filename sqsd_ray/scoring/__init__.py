"""Scoring (paper §4, Eq. 9–13): the per-sample-gradient kernel and hooks, the SQSD scorer, the score job in-process
or on a Ray Data pool, the score store, summaries.
"""
