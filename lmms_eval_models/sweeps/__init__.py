"""Internals of `flashvid-sweep` and `flashvid-report`: sweep files, run store, launchers, result tables."""
