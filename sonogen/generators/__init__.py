"""Generator families behind one contract (see ``base.Generator``) and their named registry."""

from sonogen.generators import (  # noqa: F401  (registers them)
    dcgan, diffultra, latent_diffusion, lesion_pairs, sinddm, sinddm_pool,
)
from sonogen.config import config_from_dict
from sonogen.generators.base import Generator
from sonogen.generators.families import families, get_generator, load_generator, register_family
from sonogen.sampling import to_uint8

__all__ = ["Generator", "config_from_dict", "families", "get_generator", "load_generator", "register_family", "to_uint8"]
