"""Writers for what a run leaves on disk: OME-Zarr stores, QuPath GeoJSON, tables, pictures, reports."""
