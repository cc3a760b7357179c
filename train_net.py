#!/usr/bin/env python
"""Train and evaluate MaskAttn-UNet (and its variants) with detectron2.

    python train_net.py --config-file configs/synthetic_panoptic_128.yaml
    python train_net.py --config-file configs/coco_panoptic_128.yaml --num-gpus 4
    python train_net.py --config-file configs/coco_panoptic_128.yaml --eval-only MODEL.WEIGHTS m.pth

On a machine without CUDA, ``--num-gpus N`` starts N CPU worker processes (GLOO backend).
Every worker destroys its process group before it exits (``maskattn_d2.engine.launch``).
"""
import logging

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from maskattn_d2 import add_maskattn_config
from maskattn_d2.engine import AtomicCheckpointer, MaskAttnTrainer, adapt_config_to_device, launch
from maskattn_d2.evaluation import format_results_summary


def setup(args):
    cfg = get_cfg()
    add_maskattn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    adapt_config_to_device(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskattn_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = MaskAttnTrainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = MaskAttnTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = MaskAttnTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()  # checks TEST.EXPECTED_RESULTS itself
        # Set by DefaultTrainer's evaluation hook (after the last iteration at least).
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        logging.getLogger("maskattn_d2").info(
            "Summary (PQ/SQ/RQ, AP, mIoU, pixel accuracy):\n%s", format_results_summary(results)
        )
    return results


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # detectron2's launch, with a barrier and destroy_process_group at the end of each worker.
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
