#!/usr/bin/env python
"""Evaluate a folder of Cityscapes instance result files exactly as cityscapesscripts' own command does.

`csEvalInstanceLevelSemanticLabeling` (python -m cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling)
matches every result file and then crashes writing matches.json with numpy 2 integers. This command runs the
script's own steps on the same files, found the same way: every val image's
$CITYSCAPES_DATASET/gtFine/val/*/*_gtFine_instanceIds.png against the one `<city>_<seq>_<frame>*.txt` under
$CITYSCAPES_RESULTS (else $CITYSCAPES_DATASET/results), each line `<mask png relative to it> <labelId> <score>`.
It prints the script's table and writes its JSON to $CITYSCAPES_DATASET/evaluationResults/
resultInstanceLevelSemanticLabeling.json. Unlike the script it keeps no gtInstances.json cache (a stale one
silently gives wrong numbers), and where every prediction of a class is ignored it scores 0 where the script
raises an IndexError.

  CITYSCAPES_DATASET=datasets/cityscapes CITYSCAPES_RESULTS=output/predictions/cityscapes \\
      python tools/cityscapes_evaluate.py
"""

import argparse

from cityseg_d2.errors import run_cli
from cityseg_d2.evaluation.official_cityscapes import evaluate_results_folder


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    _, export_file = evaluate_results_folder()
    print(f"results written to {export_file}")


if __name__ == "__main__":
    run_cli(main)
