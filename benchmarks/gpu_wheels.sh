#!/usr/bin/env bash
# Fetch, HERE (where pip reaches an index), the wheels the GPU machine lacks into .whl/ for its
# Python 3.12. Its image already has torch, torchvision, timm, numpy, pillow, tifffile, scikit-image,
# scipy, safetensors, pyyaml, typer, rich, psutil, fsspec, toolz, cloudpickle, msgpack, click and
# jinja2; tiffslide (the fallback reader) is left out, and imagecodecs goes as a slim zip of its JPEG,
# LZW and deflate decoders (the direct tile reads of wsi_medcam/tiff_tiles.py: 2.5 of its 26 MB), to
# stay under the 64 MiB a call may carry; py-spy's static binary goes gzipped. The shared CMU-1-Small-Region.svs goes along (../shared does not travel) as make_slide.py's
# source. Then: echo /.whl/ >> .git/info/exclude, and carry .whl to benchmarks/gpu_throughput.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(  # the versions CI installs (pip list of .ci-venv)
  pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  ome-zarr==0.18.0 ome-zarr-models==1.7 pydantic-zarr==0.9.2 deprecated==1.3.1 rangehttpserver==1.4.0 dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2
  zict==3.0.0 tornado==6.6.1 importlib-metadata==10.2.0
  shapely==2.2.0 orjson==3.13.0
  openslide-python==1.4.7 openslide-bin==4.0.1.2
  segmentation-models-pytorch==0.6.0  # grad-cam (sdist only) is imported only by the Grad-CAM explainers
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" imagecodecs==2026.3.6
python3 - "$tmp"/imagecodecs-*.whl .whl/imagecodecs-2026.3.6-slim.zip <<'PY'
import re, sys, zipfile
keep = re.compile(r"^imagecodecs/(__init__\.py|imagecodecs\.py|_imagecodecs\.py|numcodecs\.py|py\.typed|licenses/.*"
                  r"|_(jpeg8|imcd|zlib|deflate|shared|shared_cython)\.abi3\.so)$|^imagecodecs\.libs/lib(jpeg|deflate)-"
                  r"|^imagecodecs-[^/]+\.dist-info/(METADATA|licenses/.*)$")
with zipfile.ZipFile(sys.argv[1]) as whl, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as slim:
    for item in whl.infolist():
        if keep.search(item.filename):
            slim.writestr(item, whl.read(item.filename))
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$tmp" py-spy==0.4.3
unzip -p "$tmp"/py_spy-*.whl '*/scripts/py-spy' | gzip -9 >.whl/py-spy.gz  # a static binary: 8 MB, 2.8 gzipped
rm -rf "$tmp"
cp ../shared/data/slides/CMU-1-Small-Region.svs .whl/  # the H&E source of make_slide.py
du -sh .whl
