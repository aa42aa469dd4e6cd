#!/usr/bin/env bash
# Create the environment and run the whole pipeline (`dvc repro`) on the data in params.yaml.
source "$(dirname "$0")/env.sh"
dvc repro "$@"
