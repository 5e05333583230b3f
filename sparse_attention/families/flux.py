"""FLUX.1 Kontext, FLUX.2 (dev, klein) and LongCat-Image-Edit: ``comfy.ldm.flux.model.Flux``.

LongCat's ``rope_options`` shifts (set by its ``apply_model``) are applied inside ``process_img``, so its kept tokens
keep their shifted ids."""

from .base import ReferenceFamily

FLUX = ReferenceFamily(
    name="Flux (FLUX.1 Kontext, FLUX.2 dev/klein, LongCat-Image-Edit)",
    class_path="comfy.ldm.flux.model.Flux",
    variants=(("FLUX.1 Kontext", "0.3.75", "no (core's dense forward fails with it)"),
              ("FLUX.2 dev / klein", "0.3.75", "index_timestep_zero (0.30+)"),
              ("LongCat-Image-Edit", "0.30.0", "no")),
    positions="ids (index, row, col), offset or index layouts",
)
