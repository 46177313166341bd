"""`python -m pipeline.regions ...` (see `pipeline.regions.cli`)."""

from pipeline.regions.cli import main

if __name__ == "__main__":
    main()
