"""SGP-SAM MONAI Label app: tasks (infer, train, scoring, strategies) around the bundle's code in ``bundle/scripts``."""
