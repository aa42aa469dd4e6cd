#!/usr/bin/env bash
# Create the environment and run the test suite (real data from ../shared/data when present).
# Two workers (pytest-xdist), each given whole test files (module fixtures such as the dvc
# project copy are built once); pass -n 0 to run in one process.
source "$(dirname "$0")/env.sh"
python -m pytest -n 2 --dist loadfile "$@"
