"""`python -m pagedformers ...`: the same as the `pagedformers` command."""

from pagedformers.entrypoints.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
