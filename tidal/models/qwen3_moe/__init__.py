"""Qwen3-MoE (text): config, model, loader."""
