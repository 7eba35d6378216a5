"""TPM-steered molecular design: the main job (`make demo`)."""
