"""Changes carried by a MODEL or CLIP clone: weight patches (LoRA, merges), forward-pass and attention
patches, guidance hooks."""
