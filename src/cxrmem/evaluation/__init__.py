"""Evaluation statistics, pure NumPy: AUC and its bootstrap (auc), paired comparisons (paired),
operating points (thresholds), calibration, subgroups, localisation."""
