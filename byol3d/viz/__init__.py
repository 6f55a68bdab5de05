"""Pictures of the data flow: the views a config draws, and the curves a run logged.

:mod:`~byol3d.viz.preview` draws a config's views from its data (uses data and transforms);
:mod:`~byol3d.viz.plots` reads a run directory's logs (uses :mod:`byol3d.rundir`).
"""
