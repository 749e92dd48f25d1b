"""``python -m benchmarks.scale_model``: see the package's docstring."""

from benchmarks.scale_model.cli import main

if __name__ == "__main__":
    main()
