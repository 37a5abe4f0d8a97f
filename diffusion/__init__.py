"""Stable Diffusion model code: checkpoints, UNet, VAE, text encoders, tokenizer, prompt
weighting, samplers and schedules, LoRA, devices and memory. Imports nothing else of Latent Loom."""
