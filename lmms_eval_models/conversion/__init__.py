"""Checkpoint formats the suite converts into transformers' own before loading (`llava_next`: lmms-lab's LLaVA-NeXT
checkpoints of LLaVA-OneVision and LLaVA-Video)."""
