#!/usr/bin/env python
"""Train and evaluate MaskAttn-UNet (and its variants) with detectron2.

    python train_net.py --config-file configs/synthetic_panoptic_128.yaml
    python train_net.py --config-file configs/coco_panoptic_128.yaml --num-gpus 4
    python train_net.py --config-file configs/coco_panoptic_128.yaml --eval-only MODEL.WEIGHTS m.pth
    python train_net.py --register-module my_datasets.py --config-file configs/my_panoptic_128.yaml

On a machine without CUDA, ``--num-gpus N`` starts N CPU worker processes (GLOO backend).
Every worker destroys its process group before it exits (``maskattn_d2.engine.launch``).

Options added to detectron2's:

- ``--register-module MODULE``: import MODULE (a ``.py`` path or a module name) in every
  worker process before anything else, e.g. to register the user's datasets (repeatable).
- ``--onnx-model FILE``: with ``--eval-only``, evaluate a network written by
  ``tools/export_model.py`` (``model.onnx`` or ``model_int8.onnx``, run by onnxruntime on CPU
  with the config's post-processing) instead of MODEL.WEIGHTS; give the config.yaml written
  next to it.
- ``--allow-random-weights``: let ``--eval-only`` evaluate a model whose weights are missing
  (no MODEL.WEIGHTS) or only partly loaded (a checkpoint of another architecture); without
  it that is an error naming the missing / mismatched parameters.
"""
import logging

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from maskattn_d2 import add_maskattn_config
from maskattn_d2.engine import (
    MaskAttnTrainer,
    adapt_config_to_device,
    import_user_modules,
    launch,
    load_inference_weights,
)
from maskattn_d2.evaluation import format_results_summary


def get_parser():
    """detectron2's argument parser plus ``--register-module``, ``--onnx-model`` and
    ``--allow-random-weights``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-module", action="append", default=[], metavar="MODULE",
        help="import MODULE (path to a .py file, or a module name on sys.path or in the "
        "working directory) in every worker before the config is read, e.g. a module that "
        "registers your datasets; repeatable",
    )
    parser.add_argument(
        "--onnx-model", default=None, metavar="FILE",
        help="with --eval-only: evaluate this exported network (tools/export_model.py) with "
        "onnxruntime instead of the PyTorch model",
    )
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="with --eval-only: evaluate even if MODEL.WEIGHTS is empty or does not fit the "
        "model (those parameters stay randomly initialised); without it that is an error",
    )
    return parser


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
    # Each worker is a new process: the user's registrations must run in it.
    import_user_modules(getattr(args, "register_module", []))
    cfg = setup(args)
    if args.eval_only:
        onnx_model = getattr(args, "onnx_model", None)
        if onnx_model:
            from maskattn_d2.export import ONNXRuntimeModel  # onnxruntime: an optional extra

            model = ONNXRuntimeModel(cfg, onnx_model)
        else:
            model = MaskAttnTrainer.build_model(cfg)
            load_inference_weights(
                model,
                cfg.MODEL.WEIGHTS,
                allow_random=getattr(args, "allow_random_weights", False),
                save_dir=cfg.OUTPUT_DIR,
                resume=args.resume,
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
            "Summary (PQ/SQ/RQ, AP, mIoU, pixel accuracy):\n%s",
            format_results_summary(results, dataset_names=cfg.DATASETS.TEST),
        )
    return results


def invoke_main() -> None:
    parser = get_parser()
    args = parser.parse_args()
    if args.onnx_model and not args.eval_only:
        parser.error("--onnx-model evaluates an exported network: add --eval-only")
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
