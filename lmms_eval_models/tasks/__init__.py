"""Task helpers for the suite's lmms-eval tasks (configs/tasks): synthetic smoke videos, paper-protocol utils."""
