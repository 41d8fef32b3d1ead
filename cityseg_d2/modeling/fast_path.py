"""The fast path's switches as one list of config overrides: what tools/benchmark_speed.py runs as "ours"."""

# The fast path (configs/README.md, "Fast path") as KEY VALUE overrides of any config: what configs/*_fast.yaml set,
# plus bfloat16 inference, which those configs leave off for evaluation.
FAST_PATH_OPTS = [
    "SOLVER.AMP.ENABLED", "True",
    "SOLVER.AMP.PRECISION", "bfloat16",
    "CITYSEG.FAST.TRAIN_LOOP", "True",
    "CITYSEG.FAST.DATA", "True",
    "MODEL.PROPOSAL_GENERATOR.NAME", "BatchedRPN",
    "MODEL.ROI_HEADS.NAME", "BatchedROIHeads",
    "MODEL.ROI_MASK_HEAD.NAME", "TensorTargetsMaskHead",
    "CITYSEG.FAST.TEST_PRECISION", "bfloat16",
]  # fmt: skip


def fast_path_opts(test_batch_size=None):
    """FAST_PATH_OPTS, with CITYSEG.FAST.TEST_BATCH_SIZE when given (e.g. the training batch per GPU)."""
    extra = ["CITYSEG.FAST.TEST_BATCH_SIZE", str(test_batch_size)] if test_batch_size else []
    return FAST_PATH_OPTS + extra
