#!/usr/bin/env python3
"""Write the synthetic Cape Town rooftop-solar dataset (see datasets/README.md).

    .venv/bin/python datasets/make_synthetic_capetown.py                 # datasets/capetown
    .venv/bin/python datasets/make_synthetic_capetown.py --root /tmp/syn --num-train 8 --size 192

Does nothing when the folder already holds a complete set made with the same parameters
(use --overwrite to write it again).
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="datasets/capetown", help="output folder (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-val", type=int, default=12)
    parser.add_argument("--num-test", type=int, default=12)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, >= 64 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write the set again even when complete")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    import capetown_synthetic as synthetic  # datasets/capetown_synthetic, beside this script

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc="synthetic capetown")
        bar.update(1)

    try:
        summary = synthetic.make_synthetic_capetown(
            args.root, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
            size=args.size, seed=args.seed, overwrite=args.overwrite, progress=progress,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()

    if summary["generated"]:
        print(f"wrote {summary['root']} in {summary['seconds']:.1f} s")
    else:
        print(f"{summary['root']} is complete already (same parameters); nothing written "
              "(--overwrite writes it again)")
    names = synthetic.CLASS_NAMES
    print(f"{'split':<6} {'images':>6} {'empty':>6}  " + "  ".join(f"{n:>18}" for n in names))
    rows = list(summary["splits"].items()) + [("all", None)]
    for split, info in rows:
        if info is None:
            shares = summary["pixel_share"]
            n_img = sum(s["images"] for s in summary["splits"].values())
            empty = sum(s["empty_images"] for s in summary["splits"].values())
            with_ = {n: sum(s["images_with"][n] for s in summary["splits"].values()) for n in names[1:]}
        else:
            shares, n_img, empty, with_ = info["pixel_share"], info["images"], info["empty_images"], info["images_with"]
        cells = [f"{100 * shares[names[0]]:>17.2f}%"]
        cells += [f"{with_[n]:>4} img {100 * shares[n]:>7.3f}%" for n in names[1:]]
        print(f"{split:<6} {n_img:>6} {empty:>6}  " + "  ".join(f"{c:>18}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
