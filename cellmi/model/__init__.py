"""Deep InfoMax model: the encoder and its critics."""

from cellmi.model.critics import GlobalCritic, LocalCritic, PriorDiscriminator
from cellmi.model.encoder import Encoder, build_encoder, layer_plan

__all__ = ["Encoder", "GlobalCritic", "LocalCritic", "PriorDiscriminator", "build_encoder", "layer_plan"]
