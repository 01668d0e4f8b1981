"""The run folder: its files, its state against a configuration, and what it holds."""
