"""Utilities that import nothing else of cxrmem: errors, atomic files, commands, figures."""
