"""Files in, checked images out: the first stage of the data flow.

Finding images and CSV lists (:mod:`~byol3d.data.discovery`), reading volumes and frames and
checking them (:mod:`~byol3d.data.readers`, :mod:`~byol3d.data.frame_reader`), datasets and
their caches (:mod:`~byol3d.data.datasets`), dataset statistics (:mod:`~byol3d.data.stats`),
videos to frames (:mod:`~byol3d.data.video`), and synthetic CT phantoms and endoscopy frames
for demos and tests (:mod:`~byol3d.data.synthetic_ct` with its anatomy in
:mod:`~byol3d.data.phantom_anatomy`, :mod:`~byol3d.data.synthetic_frames`).
Knows nothing of transforms, models, training or evaluation.
"""
