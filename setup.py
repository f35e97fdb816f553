"""The optional C part of mailpush (src/mailpush/_speedups.c: the fan-out
path). Everything else is in pyproject.toml. Without a C compiler the
install still succeeds and mailpush runs its Python twins of the same code
(see README, "Speedups")."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mailpush._speedups",
            ["src/mailpush/_speedups.c"],
            extra_compile_args=[
                "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                "-Werror=implicit-function-declaration",
            ],
            optional=True,
        )
    ]
)
