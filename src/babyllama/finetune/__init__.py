"""Fine-tuning stages built on the one training loop: full SFT now (LoRA later)."""
