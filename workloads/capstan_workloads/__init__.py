"""Capstan's reference workloads: the trainer and the inference server (need torch)."""
