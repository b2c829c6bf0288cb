"""Preference alignment on the one training loop: DPO / IPO (dpo.py); reward models and RL next."""

from babyllama.align.dpo import DPOJob, PreferencePairs, dpo

__all__ = ["DPOJob", "PreferencePairs", "dpo"]
