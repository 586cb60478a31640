#!/usr/bin/env bash
# Installs the offline Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) when possible.
# Never fails the build: without root or apt it says how to get the data and where to point --data-dir.
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's dataset-fashion-mnist into $DIR ..."
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "warning: could not install dataset-fashion-mnist with apt-get."
fi
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST not found in $DIR. Install it with 'sudo apt-get install dataset-fashion-mnist'," \
       "or download the four IDX .gz files anywhere and pass --data-dir DIR. Tests that need it are skipped."
fi
exit 0
