"""cxrmem: multi-label chest X-ray classification with a momentum-updated memory bank."""

import warnings

__version__ = "0.1.0"

# fastai decorates a few helpers with torch.jit.script when it is imported, which torch now deprecates:
# a warning on every command that no user of cxrmem can act on (only this one message is silenced)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
