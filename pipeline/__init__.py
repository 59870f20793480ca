"""unioncam's dataset pipeline: manifest -> unit -> decoded batch -> UnionCAM -> Zarr shard.

The folders are the architecture (arrows point one way, downwards):

* ``cli.py``, ``demo.py`` -- the faces: the only modules that import the CLI.
* ``analysis/`` -- the one store reader, evaluation metrics, the report.
* ``run/`` -- the run's configuration, planning, scheduling, the driver and the worker actor.
* ``store/`` -- the store layout (THE contract: arrays, names, dims, format) and its I/O.
* ``data/`` -- locations, manifests (reading and building), class lists, image decoding.

Kept free of heavy imports on purpose: Ray actors, the CLI and tests import submodules
directly, and importing the package must not pull in Ray, torch or zarr by itself.
"""
