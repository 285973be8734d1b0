"""Discovery: concept attribution maps captured while a pipeline generates (paper 3.1-3.2).

`biasmap.trace(pipe, attribution_prompt, concepts)` is the entry point; it returns
`AttributionMaps` with IoU / BIoU and plots. Importing this package imports diffusers
only when a trace starts.
"""

from .maps import AttributionMaps
from .tokens import ConceptNotFoundError, ConceptTokens, concept_positions
from .trace import Trace, trace

__all__ = [
    "trace",
    "Trace",
    "AttributionMaps",
    "ConceptNotFoundError",
    "ConceptTokens",
    "concept_positions",
]
