"""The paper's baselines (Self-Inf-N, Bi-Anchor Grad/Reps, LARF), scored through the same pipeline as SQSD."""
