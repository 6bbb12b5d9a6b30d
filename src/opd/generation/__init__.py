"""Backends that run models: student rollouts (Hugging Face, vLLM), k-sample decoding, and
forward passes that score response positions (logits or hidden states).
"""
