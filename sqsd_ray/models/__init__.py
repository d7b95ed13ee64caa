"""Models: load the base model and tokenizer (loading), LoRA adapters in peft's terms (lora), task-vector directions
(directions), tiny test models (tiny).
"""
