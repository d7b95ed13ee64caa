"""The demo: a synthetic world, the model organism trained on it, the demo pipeline, SmolLM2, the quickstart."""
