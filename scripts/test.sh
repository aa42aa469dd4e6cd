#!/usr/bin/env bash
# Create the environment and run the test suite (real data from ../shared/data when present).
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
