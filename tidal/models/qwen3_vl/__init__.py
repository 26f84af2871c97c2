"""Qwen3-VL: so far its image processor (the vision tower and M-RoPE decoder are to come)."""
