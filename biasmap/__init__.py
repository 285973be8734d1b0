"""biasmap: discover and mitigate social bias in Stable Diffusion via cross-attention maps."""
