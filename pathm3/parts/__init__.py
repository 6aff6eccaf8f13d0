"""The registries: every part a config can name with ``type:``.

Adding a part is one new file in this package and one line in its kind's registry below; the
config loader builds each section's schema from these tables (see :mod:`pathm3.config`).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from pathm3.parts.abmil import ABMIL
from pathm3.parts.causal_lm import CausalLMCaptioner
from pathm3.parts.clam import CLAMSB
from pathm3.parts.dsmil import DSMIL
from pathm3.parts.heads import MultiLabelHead, SingleLabelHead
from pathm3.parts.identity import IdentityMixer
from pathm3.parts.nystrom import NystromMixer
from pathm3.parts.pooling import MaxPool, MeanPool
from pathm3.parts.qformer import QFormerAggregator
from pathm3.parts.t5 import NoCaptionerConfig, T5Captioner
from pathm3.parts.transmil import TransMIL

MIXERS = {
    "nystrom": NystromMixer,
    "none": IdentityMixer,
}
AGGREGATORS = {
    "qformer": QFormerAggregator,
    "abmil": ABMIL,
    "transmil": TransMIL,
    "dsmil": DSMIL,
    "clam_sb": CLAMSB,
    "mean": MeanPool,
    "max": MaxPool,
}
HEADS = {
    "single_label": SingleLabelHead,
    "multi_label": MultiLabelHead,
}
CAPTIONERS = {
    "t5": T5Captioner,
    "causal_lm": CausalLMCaptioner,
    "none": None,  # no captioner
}
CAPTIONER_CONFIGS = {"none": NoCaptionerConfig}


def section_type(registry: dict[str, Any], configs: dict[str, Any] | None = None) -> Any:
    """The pydantic type of a config section: a union of the registry's configs told apart by ``type``."""
    classes = [(configs or {}).get(name) or part.Config for name, part in registry.items()]
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]
