"""``infer --embeddings``: the model's output with each sample's joint feature vector beside it.

The joint feature vector is what AstroMAE's regression head (``concat_block``) reads: the ViT
features, the Inception features and the magnitude features, concatenated (1096 + 1096 +
1024 = 3216 floats). It is the representation people reuse for similarity search, anomaly
detection and clustering (``cai-hpc pca``).
"""

from __future__ import annotations

import torch

from cai_hpc.fast import FusedAstroMAE
from cai_hpc.layout import state_dict_shapes

EMBEDDING_DIM = state_dict_shapes()["concat_block.0.weight"][1]


class JointOutput:
    """Calls ``model`` and returns, per sample, the predicted redshift in column 0 and the
    joint feature vector after it (float32), computed once: the head runs on those features."""

    def __init__(self, model: FusedAstroMAE) -> None:
        self.model = model
        self.reference_parameters = model.reference_parameters

    def __call__(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        m = self.model
        joint = torch.cat(
            (m.vit_features(images).float(), m.inception_features(images).float(), m.magnitude_block(magnitudes)),
            dim=1,
        )
        return torch.cat((m.concat_block(joint), joint), dim=1)
