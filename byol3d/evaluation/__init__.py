"""What a run's encoder is worth, read from the run directory (never imports training).

``features`` (load_encoder, extract_features), ``probe`` (linear probe and kNN),
``dense_probe`` (frozen per-voxel linear probe, Dice), ``stats`` (paired differences with
a t interval), ``export`` (weights into segmentation networks).
"""
