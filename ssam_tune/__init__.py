"""ssam-tune: Sparse SAM (Mi et al., NeurIPS 2022) optimizers and a Ray Tune search suite.

Importing the package has no side effects beyond importing torch.
"""

from ssam_tune.optim import SAM, SSAM

__all__ = ["SAM", "SSAM"]
__version__ = "0.1.0"
