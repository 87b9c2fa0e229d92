from setuptools import find_packages, setup

setup(
    name="sparse-structured-attention",
    version="0.1.0",
    description=(
        "Sparse, structured and continuous attention (sparsemax, entmax, fusedmax, "
        "oscarmax, continuous softmax/sparsemax) for PyTorch, fairseq and transformers"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["plugin", "plugin.*", "user_dir", "user_dir.*", "hf_models", "hf_models.*"]),
    package_data={"plugin.kernels": ["*.c"], "plugin.kernels.cpu": ["*.c"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # fairseq-fixed is installed with --no-deps by the Makefile (its torchaudio
        # dependency breaks transformers); its other requirements are in requirements/fairseq.txt.
        "hf": [
            "transformers>=5.0,<6",
            "tokenizers",
            "safetensors",
            "accelerate>=1.0",
            "datasets>=3.0",
            "sacrebleu>=2.0",
            "tqdm",
        ],
        "dev": [
            "pytest>=8",
            "pytest-xdist",
            "entmax==1.3",
            "scipy",
            "ruff",
            "mypy==2.4.1",
            "matplotlib",
            "num2words",
            "scikit-learn",
            "triton==3.9.0",
        ],
    },
)
