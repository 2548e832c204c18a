"""blockcopy: block-sparse video inference for pretrained CNNs (BlockCopy, ICCV 2021)."""
from setuptools import find_packages, setup

setup(
    name="blockcopy",
    version="0.1.0",
    description="Run pretrained CNNs block-sparse on video: execute only the blocks that matter.",
    packages=find_packages(include=["blockcopy_core*", "blockcopy_d2*", "blockcopy_mmdet*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"tools": ["tqdm", "opencv-python-headless", "matplotlib"]},
)
