"""SGP-SAM bundle code (MONAI model-zoo layout: imported as ``scripts`` with the bundle root on ``sys.path``)."""

import os

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
