"""Model references, their resolution to local files, and layer-layout recognition."""
