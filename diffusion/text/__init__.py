"""Prompt text: the CLIP tokenizer, ComfyUI's weight syntax, textual-inversion embeddings."""
