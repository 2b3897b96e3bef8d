"""SGP-SAM bundle code (MONAI model-zoo layout: imported as ``scripts`` with the bundle root on ``sys.path``)."""
