"""Networks, after the transforms in the data flow: two views in, a loss out.

Encoders and the one forward-hook implementation (:mod:`~byol3d.models.encoders`), their
stages (:mod:`~byol3d.models.stages`), the projector/predictor heads
(:mod:`~byol3d.models.heads`), BYOL with its loss, tau schedule and collapse statistic
(:mod:`~byol3d.models.byol`), and the dense term (:mod:`~byol3d.models.dense`,
:mod:`~byol3d.models.correspondence`). Depends on no other byol3d package.
"""
