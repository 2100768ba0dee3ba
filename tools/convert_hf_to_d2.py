#!/usr/bin/env python3
"""Convert a Hugging Face transformers Mask2Former checkpoint (Swin backbone) to a detectron2
checkpoint of our model.

    .venv/bin/python tools/convert_hf_to_d2.py --hf-dir mask2former-swin-small-ade-semantic \\
        --output weights/m2f_swinS_ade_hf.pth [--num-classes 150] [--config-file configs/...]

``--hf-dir`` is a folder as ``save_pretrained`` writes it (config.json + model.safetensors, a
sharded index, or pytorch_model.bin), e.g. a download of facebook/mask2former-swin-small-ade-semantic.
Every tensor is mapped or reported with the reason it is not needed; a tensor no rule knows
stops the conversion (listed by name). The converted weights are checked against our model built
from the config values the checkpoint implies, which are printed as ``KEY VALUE`` lines (usable
as command-line overrides; quote the lists). ``--num-classes``: fail unless the checkpoint has
that many classes. ``--config-file``: fail unless that config has the checkpoint's architecture
(a different class count is fine: loading re-initialises the class head, and this says so).
The output is written atomically: on any error nothing is written. Exit status 2 on bad input.
Then: ``MODEL.WEIGHTS <output>`` (see rooftop_m2f/checkpoint/loading.py).
"""
import argparse
import logging
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face checkpoint folder (config.json + weights)")
    parser.add_argument("--output", required=True, help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--num-classes", type=int,
                        help="fail unless the checkpoint has this many classes")
    parser.add_argument("--config-file",
                        help="fail unless this config has the checkpoint's architecture")
    cli.add_debug_argument(parser)
    cli.add_overrides_argument(parser)
    args = parser.parse_args(argv)
    from rooftop_m2f.checkpoint.hf_conversion import (  # torch: after parsing
        ConversionError,
        convert_hf_to_file,
        format_implied_config,
    )

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.output.endswith((".pth", ".pt")):
        print(f"convert_hf_to_d2: error: --output {args.output}: use a .pth file name "
              "(detectron2 reads other extensions as other formats)", file=sys.stderr)
        return 2
    try:
        report, values, notes = convert_hf_to_file(args.hf_dir, args.output, args.num_classes,
                                                   args.config_file, args.opts)
    except ConversionError as e:
        print(f"convert_hf_to_d2: error: {e}\nNothing was written.", file=sys.stderr)
        return 2
    print(report.summary())
    print("\nConfig values this checkpoint implies:")
    print(format_implied_config(values))
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nWrote {args.output}; use it with MODEL.WEIGHTS {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
