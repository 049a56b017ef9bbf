"""Segmentation models: encoders, decoders and the prompt-conditioned head, composed like smp."""
