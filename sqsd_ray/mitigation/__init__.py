"""Acting on the scores: curate a corpus, and restore safety after a fine-tune."""
