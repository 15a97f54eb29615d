"""Toy models: tasks, the hooked toy transformer, the training loop and run directories."""
