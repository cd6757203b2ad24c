"""FlashVID model patches and lmms-eval model classes."""
