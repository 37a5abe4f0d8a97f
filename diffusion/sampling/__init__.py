"""Sampling: noise schedules, sigma schedulers, samplers by ComfyUI's names, noise, guidance and the KSampler flow."""
