"""Fine-tuning (SFT or DPO, LoRA or full) in this process or on Ray Train: config, examples, the Trainer,
checkpoints, the loop; losses (objectives) and SPF.
"""
