"""Beamline steering: an agent chooses where on a sample to take the next diffraction frame, to
find the best-diffracting spot in as few full-exposure measurements as possible.

Everything here is SYNTHETIC, generated in code (``sample``): a sample grid whose diffraction
frames come from a forward model, Bragg peaks whose intensity varies smoothly over positions
(crystalline grains) on a background that varies independently (thickness), plus Poisson detector
noise and hot pixels. A "measurement" renders a full-exposure frame and scores it with a classical
spot finder (``quality``: integrated Bragg intensity). A fast low-dose survey frame exists at every
position, as in a crystallography grid scan; the steered agent's surrogate reads the survey through
the pool's ``beamline`` adapter (TPM embeddings). It is compared with a raster scan, random
positions and two controls without the TPM (a GP on positions alone, and on a classical reading of
the survey). The agents have bluesky-adaptive's ``ingest`` / ``suggest`` / ``report`` shape.

Run: ``python -m apps.beamline_steering --budget 40 --seed 0`` (outputs under ``runs/``).
"""
