"""Directions and dynamics (paper §3): build and validate V_danger / V_safety, trajectories, init-state selection;
the sensitivity math.
"""
