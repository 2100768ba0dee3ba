"""Weights in and out: reading checkpoint files as data and checked downloads (``safe_io``),
loading ``MODEL.WEIGHTS`` into our model (``loading``), atomic checkpoint saving (``saving``),
and the Hugging Face Mask2Former conversion with its side-by-side reference (``hf_conversion``,
``hf_reference``). Importing the package is light; no module needs :mod:`rooftop_m2f.compat`
(those that build a model import :mod:`rooftop_m2f.modeling`, which applies it).
"""
