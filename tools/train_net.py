#!/usr/bin/env python
"""Train and evaluate Mask R-CNN on Cityscapes: detectron2's train_net, with cityseg_d2's datasets and evaluators.

Everything a detectron2 user types works: --config-file, --resume, --eval-only, --num-gpus, --num-machines,
--machine-rank, --dist-url and trailing KEY VALUE overrides; and --overwrite (start afresh in an OUTPUT_DIR that
holds a training) and --trust-pickle (load .pkl weights from outside detectron2's model zoo). --ray-address and
--num-workers run the same training as N Ray Train workers of a Ray cluster instead of detectron2's launch.
Examples:

  python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --num-gpus 8
  RAY_AUTH_MODE=token python tools/train_net.py --ray-address HEAD_IP:6379 --num-workers 8 \\
      --config-file configs/mask_rcnn_R_50_FPN_coco.yaml OUTPUT_DIR /shared/output/r50
  python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --eval-only \\
      MODEL.WEIGHTS output/mask_rcnn_R_50_FPN_coco/model_final.pth TEST.EVALUATORS '["cityscapes", "coco"]'
"""
import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
import shlex
import sys

from detectron2.engine import default_argument_parser

from cityseg_d2.engine import Trainer, launch, setup
from cityseg_d2.engine.output_dir import release_output_dir
from cityseg_d2.errors import run_cli


def resume_command(argv):
    """The command that continues this training: the same, with --resume (and without --overwrite)."""
    return shlex.join(["python", argv[0], "--resume", *(a for a in argv[1:] if a not in ("--resume", "--overwrite"))])


def main(args):
    cfg = setup(args)
    try:
        if args.eval_only:
            return Trainer.evaluate_weights(cfg, resume=args.resume)
        trainer = Trainer(cfg)
        trainer.resume_hint = f"continue with: {resume_command(sys.argv)}"
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    finally:
        release_output_dir(cfg.OUTPUT_DIR)


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUTPUT_DIR that holds a training (its checkpoints and metrics.json are removed)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load .pkl MODEL.WEIGHTS from outside detectron2's model zoo (a pickle can run code when loaded)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="train on the Ray cluster there, as --num-workers Ray Train workers (OUTPUT_DIR on storage all nodes share)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="with --ray-address: Ray Train workers, one GPU each where there are GPUs",
    )
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    if args.ray_address:
        from cityseg_d2.tune import train_on_ray  # Ray only where it is used

        run_cli(train_on_ray, main, args)
    elif args.num_workers != 1:
        parser.error("--num-workers needs --ray-address (without Ray, --num-gpus starts the processes)")
    else:
        run_cli(
            launch,
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
