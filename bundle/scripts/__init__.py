"""SGP-SAM bundle code (MONAI model-zoo layout: imported as ``scripts`` with the bundle root on ``sys.path``).

* ``modeling/``: the SAM-Med3D backbone, the Self-Gated Prompting Module, the click map and the refiner, and the
  network builder with its presets.
* ``data/``: SAM-Med3D's preprocessing and the lesion-centred crops as MONAI transforms, and the embedded synthetic
  lesion generator.
* ``training/``: the click-simulating engines, the click rounds, the Zoom Loss, the trainable-parameter policy and
  the weight average.
* ``interactive/``: the click-session engine of inference and the MONAI Label app (cache, sessions, windows).
* ``clicks.py`` (click protocols and metrics), ``checkpoint.py`` (safe loading), ``evaluate.py``, ``inference.py``
  and ``export.py``: the bundle's workflows.
* ``baselines/``: the methods SGP-SAM is compared with (MA-SAM, TAGS and its text prompts), as network extensions.
"""

import os

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
