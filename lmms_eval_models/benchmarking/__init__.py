"""Internals of `flashvid-bench`: model presets, synthetic video inputs, stage timing, FLOPs and the table.

The paper's Table 6 split (vision encoding, compression, LLM forward, prefill = compression + LLM forward,
TTFT) measured on one model instance, vanilla and FlashVID in the same process.
"""
