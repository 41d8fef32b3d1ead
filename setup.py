"""cityseg-d2: Cityscapes instance segmentation with Mask R-CNN on Detectron2.

torch and detectron2 are not in install_requires, as in every detectron2 project: they must match the
machine's CUDA, so `tools/setup_env.sh` (or the user) installs them first.
"""
from setuptools import find_packages, setup

setup(
    name="cityseg-d2",
    version="0.1.0",
    description="Cityscapes instance segmentation with Mask R-CNN on Detectron2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cityseg_d2", "cityseg_d2.*"]),
    install_requires=[
        # cityscapesscripts 2.3.0 calls np.in1d (removed in numpy 2.4); Ray Tune's pandas/pyarrow need numpy 2.
        "numpy>=2,<2.4",
        "cityscapesscripts>=2.2",
        "pycocotools>=2.0.2",
        # The same cv2 as opencv-python without the GUI libraries a headless GPU server lacks.
        "opencv-python-headless>=4.8",
        "Pillow>=9",
        "ray[tune]>=2.9",
        # cityseg_d2.tune probes a Ray head's address over gRPC (Ray itself depends on it).
        "grpcio",
        # wandb.login(prompt=False), used to tell online from offline, came with 0.31.
        "wandb>=0.31",
        "optuna>=3.0",
        "matplotlib",
        "tqdm",
        "tabulate",
        "PyYAML",
        # Resolves overlapping Cityscapes polygons into visible parts (and detectron2's loader, our benchmark's reference).
        "shapely",
        # detectron2.model_zoo imports pkg_resources, which setuptools 81 removed.
        "setuptools<81",
    ],
    # tools/export_model.py --format onnx and running an exported .onnx (onnxruntime); the tests check both.
    extras_require={
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],
        "test": ["pytest>=7", "pytest-timeout>=2", "onnx>=1.14", "onnxruntime>=1.16"],
    },
)
