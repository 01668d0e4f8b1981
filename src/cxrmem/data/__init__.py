"""ChestX-ray14 metadata, splits, synthetic data, caches and fastai loaders."""
