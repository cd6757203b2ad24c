"""FlashVID's vision-side token compression and inner-LLM selection, in pure PyTorch."""
