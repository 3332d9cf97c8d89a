"""Training: the latent diffusion recipe (an autoencoder stage, then a diffusion stage in its latents).

``data`` (batches of the shapes dataset), ``losses``, ``ema``, ``loop`` (a generic loop with
checkpoints and resume), ``autoencoder`` and ``diffusion`` (the two stages), ``embedded`` (the recipe
and export of the embedded default model) and ``cli`` (``openldm train``). Nothing heavy at import.
"""
