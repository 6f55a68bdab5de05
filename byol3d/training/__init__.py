"""Training: composes data, transforms and models into a run that writes the run directory.

:func:`~byol3d.training.pretrain.pretrain` composes the builders of
:mod:`~byol3d.training.builders` and the file list of :mod:`~byol3d.training.files`; the
Ignite engine (:mod:`~byol3d.training.engine`) and its handlers
(:mod:`~byol3d.training.handlers`), optimizers and schedules (:mod:`~byol3d.training.optim`),
speed switches (:mod:`~byol3d.training.accel`), DDP
(:mod:`~byol3d.training.distributed`), checkpoints and resuming
(:mod:`~byol3d.training.checkpoint`). Uses evaluation's feature extractor for the online kNN
monitor; nothing but the command line imports training.
"""
