"""polytope-lens: look at any PyTorch network through the polytope lens.

The kink registry (``kinks``) describes every nonlinearity once; ``capture`` finds where a model applies them;
``codes`` turns that into packed spline codes and distances.
"""

from .capture import CallSite, capture, list_sites
from .codes import LayerCodes, SplineCodes, UnitSelection, hamming, jaccard, spline_codes
from .errors import InvalidInputError, MissingDependencyError, PolytopeLensError, UnsupportedActivationError
from .kinks import REGISTRY, Activation, get_activation

__version__ = "0.1.0"

__all__ = [
    "Activation", "CallSite", "InvalidInputError", "LayerCodes", "MissingDependencyError", "PolytopeLensError",
    "REGISTRY", "SplineCodes", "UnitSelection", "UnsupportedActivationError", "capture", "get_activation",
    "hamming", "jaccard", "list_sites", "spline_codes", "__version__",
]
