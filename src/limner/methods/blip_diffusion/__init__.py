"""BLIP-Diffusion (Li, Li and Hoi, 2023): the method (method.py), its subject encoder (qformer.py), its
context-aware text encoding and prompt (context_text.py), and its files (formats.py)."""

from limner.methods.blip_diffusion.method import BlipDiffusion, BlipDiffusionSettings

__all__ = ["BlipDiffusion", "BlipDiffusionSettings"]
