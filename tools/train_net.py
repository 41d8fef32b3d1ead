#!/usr/bin/env python
"""Train and evaluate Mask R-CNN on Cityscapes: detectron2's train_net, with cityseg_d2's datasets and evaluators.

Everything a detectron2 user types works: --config-file, --resume, --eval-only, --num-gpus, --num-machines,
--machine-rank, --dist-url and trailing KEY VALUE overrides. Examples:

  python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --num-gpus 8
  python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --eval-only \\
      MODEL.WEIGHTS output/mask_rcnn_R_50_FPN_coco/model_final.pth TEST.EVALUATORS '["cityscapes", "coco"]'
"""
import cityseg_d2  # noqa: F401  (before detectron2: silences the warnings its import prints)
from detectron2.engine import default_argument_parser, launch

from cityseg_d2.engine import Trainer, setup
from cityseg_d2.errors import run_cli


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return Trainer.evaluate_weights(cfg, resume=args.resume)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser(epilog=__doc__).parse_args()
    run_cli(
        launch,
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
