#!/usr/bin/env bash
# Hugging Face PEFT 0.21's own test file on hand-written modules (tests/test_custom_models.py), restricted to the
# methods peftkit supports, run twice: against real peft (the reference) and with `import peft` switched to
# peftkit (shim/peft: peftkit's public API; any other peft name is a stand-in that fails when used).
# Prints the share of the tests PEFT passes that peftkit passes too. Needs network once for the sdist.
# Usage: benchmarks/peft_suite/run.sh [SAMPLE_EVERY]   (e.g. 4 runs every 4th test, ~4x faster)
#        FILES="tests/test_config.py tests/test_mixed.py" benchmarks/peft_suite/run.sh   (other test files)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); work=${WORK:-/tmp/peft_suite}; every=${1:-1}
mkdir -p "$work" && cd "$work"
[ -d peft-0.21.2 ] || { pip download --no-deps --no-binary :all: peft==0.21.2 -d . && tar xzf peft-0.21.2.tar.gz; }
cd peft-0.21.2 && touch tests/__init__.py
export HF_HUB_OFFLINE=1 SAMPLE_EVERY=$every
files=${FILES:-tests/test_custom_models.py}
run() { PYTHONPATH="$1" python -m pytest -o addopts="" -p supported_only -q $files \
          -p no:cacheprovider --tb=no --junitxml="$2" > "$2.log" 2>&1 || true; }
run "$here/plug" "$work/ref.xml"
run "$here/shim:$here/plug:$here/../../src" "$work/ours.xml"
python "$here/ratio.py" "$work/ref.xml" "$work/ours.xml" 15
