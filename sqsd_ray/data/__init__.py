"""Data: read and normalise fine-tuning records (records, location, presets) and tokenise them (tokenize)."""
