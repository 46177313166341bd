"""`python -m pipeline.features encode|pool|demo-encoder` (see `pipeline.features.stage`)."""

from pipeline.features.stage import main

if __name__ == "__main__":
    main()
