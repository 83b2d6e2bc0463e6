"""Generator families behind one contract (see ``base.Generator``) and their named registry."""

from sonogen.generators import dcgan, diffultra, latent_diffusion, sinddm  # noqa: F401  (registers the families)
from sonogen.generators.base import Generator, config_from_dict, load_generator, to_uint8
from sonogen.generators.registry import families, get_generator, register_family

__all__ = ["Generator", "config_from_dict", "families", "get_generator", "load_generator", "register_family", "to_uint8"]
