"""Losses, callbacks and the two-phase training driver."""
