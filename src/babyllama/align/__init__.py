"""Preference alignment on the one training loop: DPO / IPO (dpo.py); reward models and RL next.

Stages are functions of their module (`babyllama.align.dpo.dpo(DPOJob(...))`), as `finetune.sft.sft`."""
