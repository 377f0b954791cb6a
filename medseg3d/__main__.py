"""`python -m medseg3d ...` runs the CLI (also how torchrun launches training)."""

from medseg3d.cli import main

if __name__ == "__main__":
    main()
