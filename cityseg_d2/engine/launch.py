"""detectron2's launch, with every process it starts closing its process groups before the interpreter exits.

Without that, a process whose work had finished can abort at exit (SIGABRT, "terminate called without an active
exception"): a gloo worker thread still releasing the last collective's tensors needs the GIL while Python is being
torn down (7 of 123 two-process evaluations here; pytorch/pytorch#179291). destroy_process_group alone
does not stop those threads: detectron2's comm keeps its own references to the groups (its local group, and the
cached global one that all_gather uses), and a group's threads end only when its last reference goes.
"""

import functools
import gc

import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm


def drop_detectron2_group_references():
    """detectron2's comm holds its local group and caches the global one for all_gather: without these references a
    destroyed group's threads are joined at once."""
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()


def close_process_groups():
    """After the last collective of every rank: destroy the process groups and drop detectron2's references, so
    that their threads are joined now (with the GIL released) rather than during the interpreter's exit."""
    comm.synchronize()
    gc.collect()  # a DDP model in a reference cycle would keep its group alive
    dist.destroy_process_group()
    drop_detectron2_group_references()


def _run_then_close_process_groups(main_func, *args):
    result = main_func(*args)
    if dist.is_initialized():
        close_process_groups()
    return result


def launch(main_func, num_gpus_per_machine, **kwargs):
    """detectron2.engine.launch(main_func, num_gpus_per_machine, **kwargs); each process it starts closes its
    process groups when main_func returns (on an error it exits as detectron2's would). With one process no group
    exists and main_func runs as it is."""
    return detectron2_launch(
        functools.partial(_run_then_close_process_groups, main_func), num_gpus_per_machine, **kwargs
    )
