"""The compiled sweep of the streaming pass (`bnwd_cli/metrics/_sweep.c`), an optional extension.

Everything else is configured in pyproject.toml. The extension is optional: where no C compiler
is found, the install goes on and bnwd uses the numpy sweep (same figures, slower; see
README, "Dependencies, and why").
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]

setup(
    ext_modules=[
        Extension(
            "bnwd_cli.metrics._sweep",
            sources=["bnwd_cli/metrics/_sweep.c"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ]
)
