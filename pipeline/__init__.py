"""unioncam's dataset pipeline: manifest -> unit -> decoded batch -> UnionCAM -> Zarr shard.

Kept free of heavy imports on purpose: Ray actors, the CLI and tests import submodules
(``pipeline.manifest``, ``pipeline.store``, ...) directly, and importing the package must
not pull in Ray, torch or zarr by itself.
"""
