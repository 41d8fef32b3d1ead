"""Report the versions this project depends on: `python -m cityseg_d2.collect_env [--short]`."""
import argparse
import importlib
import importlib.util
import platform
import sys


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import can fail with any error (e.g. a broken CUDA build)
        return f"not importable ({type(e).__name__}: {e})"
    return getattr(module, "__version__", "installed")


def _cityscapesscripts_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cityscapesScripts")
    except PackageNotFoundError:
        return "not installed"


def _detectron2_compiled_ops():
    """Whether detectron2's _C extension is there; without it only deformable conv and rotated boxes fail."""
    if importlib.util.find_spec("detectron2") is None:
        return "n/a"
    try:
        importlib.import_module("detectron2._C")
        return "present"
    except ImportError:
        return "absent (pure-Python build: deformable conv and rotated-box ops unavailable)"


def _cuda_devices():
    try:
        import torch
    except ImportError:
        return ["torch not importable"]
    if not torch.cuda.is_available():
        return [f"none (torch built for CUDA {torch.version.cuda})" if torch.version.cuda else "none (CPU build)"]
    return [f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def collect_env_rows():
    """(name, value) pairs describing the environment."""
    return [
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2")),
        ("detectron2._C", _detectron2_compiled_ops()),
        ("cityscapesscripts", _cityscapesscripts_version()),
        ("pycocotools", _version("pycocotools")),
        ("cv2", _version("cv2")),
        ("numpy", _version("numpy")),
        ("ray", _version("ray")),
        ("wandb", _version("wandb")),
        ("optuna", _version("optuna")),
        ("cityseg_d2", _version("cityseg_d2")),
        ("CUDA devices", "; ".join(_cuda_devices())),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="one line: torch, detectron2 and CUDA devices")
    args = parser.parse_args(argv)
    rows = collect_env_rows()
    if args.short:
        wanted = {"torch", "detectron2", "detectron2._C", "CUDA devices"}
        print(", ".join(f"{k} {v}" for k, v in rows if k in wanted))
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
