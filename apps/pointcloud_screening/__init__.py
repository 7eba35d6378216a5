"""Point-cloud screening: an agent picks which lattice samples to analyse under a budget, steered by
a surrogate on TPM embeddings from a tpmflow pool, against random picks.

Everything here is SYNTHETIC, generated in code: noisy simple-cubic lattice point clouds with a
hidden density of vacancies and interstitials (``samples``). The "simulation" is a real geometric
analysis of one cloud, a coordination-number defect count (``analysis``). The objective is to find
the sample with the lowest measured defect fraction in as few analyses as possible.

Run: ``python -m apps.pointcloud_screening --budget 40 --seed 0`` (outputs under ``runs/``).
"""
