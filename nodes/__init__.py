"""The built-in typed nodes, one module per family; thin declarations over `diffusion/`."""
