"""`nic compress`: slides -> Parquet feature grids on a Ray Data actor pool.

Entry point: `nic.compress.stage.run_compress(CompressConfig) -> int`. The grid format itself lives
in `nic.grids`; readers never need this package (or Ray).
"""
