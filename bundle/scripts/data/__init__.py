"""Data: SAM-Med3D's preprocessing and lesion-centred crops as MONAI transforms, datalists, and the embedded
synthetic lesion generator."""
