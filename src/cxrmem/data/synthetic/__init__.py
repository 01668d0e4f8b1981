"""A synthetic ChestX-ray14: the real on-disk layout, with drawn, learnable findings.

``generate(out_dir, n_patients, size, seed)`` (or ``python -m cxrmem.data.synthetic --out
DIR --n-patients N --size PX --seed S``, or ``cxrmem-synthetic``) writes the CSV in the
2017 format, official-style patient-level lists and grayscale PNGs under
``images_*/images``. Seeded and deterministic. The parts:

- :mod:`.labels`: label sets with the real prevalence and co-occurrence;
- :mod:`.plan`: patients, follow-ups, metadata and the patient-level split;
- :mod:`.drawing`: the pixels, one painter per finding;
- :mod:`.writing`: the files, resumable and atomic;
- ``__main__``: the command line.
"""

from .writing import generate, holds, is_synthetic, wants_generating

__all__ = ["generate", "holds", "is_synthetic", "wants_generating"]
