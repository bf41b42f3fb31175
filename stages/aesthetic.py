"""The LAION aesthetic predictor: an MLP over L2-normalised CLIP ViT-L/14 image embeddings.

Same layout as the public "improved aesthetic predictor" checkpoint
(``sac+logos+ava1-l14-linearMSE.pth``: ``layers.{0,2,4,6,7}``), so that file loads with
``stages.weights.load_weights``. It scores an image on the 1-10 scale of the AVA ratings.
"""

from __future__ import annotations

import torch
from torch import nn

# The public checkpoint, for cluster runs; it expects OpenAI CLIP ViT-L/14 embeddings (768-d).
IMPROVED_AESTHETIC_PREDICTOR_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


class AestheticPredictor(nn.Module):
    """Aesthetic score from a CLIP image embedding."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        # The dropouts only matter in training; they keep the checkpoint's layer indices.
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) raw or normalised embeddings -> (B,) scores; normalises first, as the predictor was trained."""
        normalised = image_embedding / image_embedding.norm(dim=-1, keepdim=True)
        return self.layers(normalised).squeeze(-1)
