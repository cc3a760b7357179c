#!/usr/bin/env python3
"""Write low-resolution training copies of registered COCO-layout panoptic datasets.

Training resizes every image to the network size (128x128), so reading COCO-size files
(640x480) spends most of the loader's time decoding pixels the network never sees. This
writes, for each dataset named by ``--datasets`` (any registered panoptic dataset whose
metadata names ``panoptic_json``, ``panoptic_root`` and ``image_root``: maskattn_d2's,
detectron2's ``coco_2017_train_panoptic``, your own through ``--register-module``):

    $MASKATTN_D2_CACHE/lowres/<name>_lowres<S>/
      images/<file name>            short side S (aspect kept, bilinear); images already at
                                    most S are copied unchanged; JPEGs at quality 95
      panoptic/<file name>.png      RGB-encoded ids, nearest neighbour at pixel centres
      panoptic.json                 the source json with height/width, areas and bboxes
                                    recounted; segments left without a pixel are dropped
      instances.json                COCO instances (RLE), for instance AP
      panoptic_semseg/*.png         contiguous semantic labels (255 void)
      MASKATTN_COMPLETE.json        marker: source json, S, format version

Train from it with ``DATASETS.TRAIN_LOWRES_SHORT_SIDE S`` (the copies are registered as
"<name>_lowres<S>" when training starts); evaluation keeps reading the original files at their
original size. A second run with the same arguments does nothing (``--overwrite`` replaces).

Usage:
    python datasets/prepare_lowres_copy.py --datasets coco_2017_train_panoptic --workers 8
    python datasets/prepare_lowres_copy.py --register-module my_datasets.py \
        --datasets my_panoptic_train --short-side 192
"""
import argparse
import logging
import sys
import time

from maskattn_d2.data.datasets.lowres_copy import lowres_copy_root, write_lowres_copy
from maskattn_d2.engine import import_user_modules


def _progress(name: str):
    """A tqdm bar over the finished images of one dataset."""
    from tqdm import tqdm

    def wrap(iterable, total):
        return tqdm(iterable, total=total, desc=name, unit="img", file=sys.stderr)

    return wrap


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", required=True, metavar="NAME",
        help="registered panoptic datasets to copy (training splits)",
    )
    parser.add_argument(
        "--short-side", type=int, default=160,
        help="short side of the copy's images in pixels (default 160; keep it above the "
        "network size so the network-size targets match those from the originals)",
    )
    parser.add_argument("--workers", type=int, default=1, help="number of processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a copy written by an earlier run"
    )
    parser.add_argument(
        "--register-module", action="append", default=[], metavar="MODULE",
        help="import MODULE (a .py path or a module name) first, e.g. to register your "
        "datasets; repeatable",
    )
    args = parser.parse_args(argv)
    if args.short_side < 1:
        parser.error(f"--short-side must be a positive number of pixels, got {args.short_side}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_user_modules(args.register_module)
    for name in args.datasets:
        start = time.perf_counter()
        output = lowres_copy_root(name, args.short_side)
        counts = write_lowres_copy(
            name,
            args.short_side,
            output=output,
            workers=max(args.workers, 1),
            overwrite=args.overwrite,
            progress=_progress(name),
        )
        if not counts:
            print(f"{name}: {output} already holds this copy; nothing to do (see --overwrite)")
            continue
        print(
            f"{name}: {counts['images']} images ({counts['resized']} resized), "
            f"{counts['segments']} segments -> {output} in {time.perf_counter() - start:.1f} s"
        )
        if counts["dropped_segments"]:
            print(
                f"  {counts['dropped_segments']} segments ({counts['dropped_things']} thing "
                f"instances) keep no pixel at short side {args.short_side} and were dropped "
                "from segments_info"
            )


if __name__ == "__main__":
    main()
