"""Recipes: short scripts that compose the engine into the R1 pipelines, and the embedded default's tiny world."""
