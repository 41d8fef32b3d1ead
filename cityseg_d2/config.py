"""Config keys cityseg_d2 adds to detectron2's defaults."""
from detectron2.config import CfgNode as CN


def add_cityseg_config(cfg):
    """Add cityseg_d2's keys (with their defaults) to a detectron2 config, in place."""
    _add_dataset_keys(cfg)
    _add_evaluation_keys(cfg)
    _add_training_keys(cfg)
    _add_fast_path_keys(cfg)
    _add_wandb_keys(cfg)
    return cfg


def _add_dataset_keys(cfg):
    # Options of the Cityscapes datasets named in DATASETS.TRAIN / DATASETS.TEST; applied by
    # cityseg_d2.data.register_from_config(cfg), so a YAML can train on a subset without code.
    c = cfg.DATASETS.CITYSCAPES = CN()
    c.ROOT = ""  # "" = $CITYSCAPES_DATASET, else $DETECTRON2_DATASETS/cityscapes, else ./datasets/cityscapes
    c.CLASS_SET = "cityscapes8"  # "cityscapes8" (officially evaluated) or "cityscapes10" (+ caravan, trailer)
    c.MASK_SOURCE = "polygons"  # "polygons" (gtFine_polygons.json) or "instance_ids" (instanceIds.png, exact)
    c.CITIES = []  # [] = all cities
    c.CACHE = True  # parsed dicts cached on disk, keyed by the files and the options
    c.TRAIN_MAX_IMAGES = 0  # 0 = all; else a seeded, deterministic sample of that many images
    c.TEST_MAX_IMAGES = 0
    c.TRAIN_IMAGE_LIST = ""  # text file of image ids (e.g. aachen_000000_000019), one a line
    c.TEST_IMAGE_LIST = ""
    c.SUBSET_SEED = 0


def _add_evaluation_keys(cfg):
    # Evaluators for TEST.EVAL_PERIOD and --eval-only: "cityscapes_fast" (in-memory, the official
    # protocol), "cityscapes" (the official cityscapesscripts script), "coco" (bbox and segm COCO AP).
    cfg.TEST.EVALUATORS = ["cityscapes_fast"]
    c = cfg.TEST.CITYSCAPES = CN()
    # Each image's ground truth decoded once and kept (compact .npz) in the dataset cache ($CITYSEG_D2_CACHE_DIR, else
    # ~/.cache/cityseg_d2) under cityscapes_gt_regions/, so every later evaluation skips decoding the instanceIds PNGs.
    c.CACHE_GROUND_TRUTH = True
    # "cityscapes_fast" also saves the predictions (masks as RLE) to <output>/cityscapes_predictions.npz,
    # which tools/eval_report.py analyses without running the model again.
    c.SAVE_PREDICTIONS = False


def _add_training_keys(cfg):
    cfg.CITYSEG = CN()
    # The periodic evaluation result that picks the best checkpoint ("" = keep no best checkpoint).
    cfg.CITYSEG.BEST_CHECKPOINT_METRIC = "segm/AP"
    cfg.CITYSEG.BEST_CHECKPOINT_MODE = "max"
    # MODEL.WEIGHTS may be a .pkl (a pickle, which can run code when loaded) from outside detectron2's model zoo
    # only when this says you trust it (train_net.py: --trust-pickle); .pth files are read weights-only anyway.
    cfg.CITYSEG.TRUST_PICKLE_WEIGHTS = False


def _add_fast_path_keys(cfg):
    # The fast training and inference path (cityseg_d2.modeling, configs/README.md "Fast path"); each key works
    # alone. The model's components are switched by their registry names: MODEL.PROPOSAL_GENERATOR.NAME
    # "BatchedRPN", MODEL.ROI_HEADS.NAME "BatchedROIHeads", MODEL.ROI_MASK_HEAD.NAME "TensorTargetsMaskHead".
    cfg.SOLVER.AMP.PRECISION = "float16"  # with SOLVER.AMP.ENABLED: "float16" (grad scaling) or "bfloat16"
    f = cfg.CITYSEG.FAST = CN()
    f.TRAIN_LOOP = False  # our loop: autocast on GPU or CPU, the step's statistics read in one host sync
    f.DATA = False  # polygon edges packed in the loader workers, pinned memory, next batch prefetched to the GPU
    f.NMS = "torchvision"  # BatchedRPN/BatchedROIHeads: "torchvision" (per image) or "grouped" (whole batch)
    f.CHANNELS_LAST = False
    f.COMPILE = False  # torch.compile the backbone (one graph per input size)
    f.COMPILE_BACKEND = "inductor"
    f.TEST_BATCH_SIZE = 1  # images per forward pass at inference (test loader, batched predictor)
    f.TEST_PRECISION = ""  # "" (float32), "bfloat16" or "float16": autocast at inference


def _add_wandb_keys(cfg):
    # Weights & Biases, on when ENABLED or $WANDB_PROJECT is set; WANDB_* environment variables fill what is
    # left empty here (see cityseg_d2.integrations.wandb).
    w = cfg.WANDB = CN()
    w.ENABLED = False
    w.PROJECT = ""  # "" = $WANDB_PROJECT, else "cityseg-d2"
    w.ENTITY = ""
    w.NAME = ""
    w.GROUP = ""
    w.TAGS = []
    w.MODE = ""  # "" = online with an API key, else offline; "online", "offline" or "disabled"
    w.LOG_CHECKPOINTS = False  # best and final checkpoints as model artifacts
    w.LOG_DATASET_STATS = True  # the dataset explorer's tables when a run starts
    w.NUM_VIS_IMAGES = 4  # fixed val images shown with predictions at each evaluation
    w.VIS_SCORE_THRESHOLD = 0.5  # predictions below this score are left out of those images
    w.INIT_TIMEOUT = 60  # seconds; after that training goes on without W&B


def get_cityseg_cfg():
    """detectron2's default config plus cityseg_d2's keys."""
    from detectron2.config import get_cfg

    return add_cityseg_config(get_cfg())
