"""Experiments built from the stages: the codebook-collapse study and the tokenizer comparison."""
