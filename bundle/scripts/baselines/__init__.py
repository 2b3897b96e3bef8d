"""Published baselines the transfer study compares SGP-SAM with, as optional network extensions: MA-SAM's 3D adapters
and FacT (``ma_sam``), TAGS' anatomy and semantic prompts (``tags``) and the text vectors TAGS aligns with
(``text_prompts``). SGP-SAM itself does not use them."""
