#!/bin/sh
# lrsa-serve container entry point (runs under tini, which reaps vLLM's engine processes).
#
#   no arguments, or flags only  -> lrsa serve MODEL --host 0.0.0.0 --port $LRSA_PORT FLAGS...
#   anything else                -> run it as given (lrsa train ..., torchrun ..., sh -c ...)
#
# MODEL is $LRSA_MODEL, a local HF folder (a mounted volume); when it is unset, the model baked in
# at build time (--build-arg MODEL=default) under $LRSA_HOME/models is used. Nothing is ever
# downloaded at run time: a missing model is an error, not a fetch.
set -eu

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    model="${LRSA_MODEL:-}"
    if [ -z "$model" ]; then
        for candidate in "${LRSA_HOME:-/opt/lrsa}"/models/*/; do
            if [ -f "${candidate}config.json" ]; then
                model="${candidate%/}"
                break
            fi
        done
    fi
    if [ -z "$model" ]; then
        echo "lrsa-serve: no model: mount an HF model folder and set LRSA_MODEL to its path," \
            "or build the image with --build-arg MODEL=default" >&2
        exit 2
    fi
    if [ ! -f "$model/config.json" ]; then
        echo "lrsa-serve: LRSA_MODEL=$model is not an HF model folder (no config.json)" >&2
        exit 2
    fi
    exec lrsa serve "$model" --host "${LRSA_HOST:-0.0.0.0}" --port "${LRSA_PORT:-8000}" "$@"
fi
exec "$@"
