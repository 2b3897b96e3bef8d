"""Give a weights-only checkpoint the description a model file needs (network + preprocessing, scripts.model_file).

For files written before model files carried their description. You state how the weights were trained; the
weights must fit that network exactly (every key, every shape), or nothing is written. Example (a tiny-preset
checkpoint trained like the shipped default model)::

    python tools/describe_model_file.py old_model.pt described_model.pt --preset tiny --click_map --refiner \
        --multi_click --roi_size 64 --spacing 1.5 --normalisation robust --half
"""

from __future__ import annotations

import argparse
import os
import sys

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
if BUNDLE not in sys.path:
    sys.path.insert(0, BUNDLE)

from scripts.checkpoint import extract_state_dict, read_checkpoint  # noqa: E402
from scripts.model_file import Preprocessing, read_model_file, save_model_file  # noqa: E402
from scripts.modeling import PRESETS, build_sgp_sam  # noqa: E402


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("target", help="may be the source itself (written atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--no_sgpm", action="store_true", help="the plain backbone (no SGPM weights)")
    for flag in ("click_map", "refiner", "multi_click"):
        parser.add_argument(f"--{flag}", action="store_true")
    parser.add_argument("--raw_masks", action="store_true", help="click_consistent off")
    parser.add_argument("--roi_size", type=int, required=True)
    parser.add_argument("--spacing", type=float, required=True)
    parser.add_argument("--image_channel", type=int, default=None)
    parser.add_argument("--ct_clamp", action="store_true")
    parser.add_argument("--normalisation", choices=("upstream", "robust"), required=True)
    parser.add_argument("--half", action="store_true", help="store floats as float16")
    args = parser.parse_args(argv)

    network = build_sgp_sam(
        args.preset,
        sgpm=not args.no_sgpm,
        img_size=args.roi_size,
        click_map=args.click_map,
        refiner=args.refiner,
        multi_click=args.multi_click,
        click_consistent=not args.raw_masks,
    )
    network.load_state_dict(extract_state_dict(read_checkpoint(args.source)), strict=True)
    preprocessing = Preprocessing(args.spacing, args.roi_size, args.image_channel, args.ct_clamp, args.normalisation)
    save_model_file(network, preprocessing, args.target, half=args.half)
    read_model_file(args.target)  # it loads back as a model file
    print(f"wrote {args.target} ({os.path.getsize(args.target) / 2**20:.1f} MiB): {preprocessing}")
    return args.target


if __name__ == "__main__":
    main()
