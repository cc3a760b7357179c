#!/usr/bin/env bash
# One-command set-up of maskattn_d2: torch, torchvision, detectron2, panopticapi,
# fvcore, pycocotools, opencv, onnx + onnxruntime, pytest and the project (editable).
#
# Installs into the active virtual environment ($VIRTUAL_ENV) if there is one,
# otherwise creates .venv/ in the repository. Idempotent: a stamp file records
# the hash of what was installed, so a second run only checks imports and pins.
# `scripts/setup.sh check` only checks (imports, and installed versions == pins).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# The two --no-deps distributions are pinned in requirements.txt as "# name := dist==version".
pinned_dist() { sed -n "s/^# $1 := \(.*\)$/\1/p" "$repo/requirements.txt"; }
DETECTRON2_DIST="$(pinned_dist detectron2)"   # sal-detectron2: upstream detectron2 a59f0563
PANOPTICAPI_DIST="$(pinned_dist panopticapi)"
CITYSCAPES_DIST="$(pinned_dist cityscapesscripts)"  # Cityscapes evaluators and prepare tools
[[ -n "$DETECTRON2_DIST" && -n "$PANOPTICAPI_DIST" && -n "$CITYSCAPES_DIST" ]] || { echo "[setup] pins missing in requirements.txt" >&2; exit 1; }

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
else
  venv="$repo/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check --no-input)

stamp="$venv/.maskattn_d2_setup_stamp"
want="$(cat requirements.txt setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)"

check_imports() {
  "$py" - <<'PY'
import detectron2, torch, torchvision, panopticapi, pycocotools, fvcore, cv2, maskattn_d2
import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling  # noqa: F401
from detectron2.evaluation import COCOPanopticEvaluator  # noqa: F401
from torchvision.ops import nms  # noqa: F401  (fails when torch/torchvision mismatch)
import onnx, onnxruntime  # noqa: F401,E401  (the 'onnx' extra: export, onnxruntime backend)
print(f"[setup] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, maskattn_d2 {maskattn_d2.__version__}")
PY
}

# Every "name==version" of requirements.txt (and "# name := dist==version") is installed at
# exactly that version (torch wheels may add a local suffix such as "+cu130").
check_pins() {
  "$py" - "$repo/requirements.txt" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
pins = {}
for line in open(sys.argv[1]):
    line = line.strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line) or re.match(
        r"^#\s*\w+ := ([A-Za-z0-9_.\-]+)==(\S+)", line)
    if m:
        pins[m.group(1)] = m.group(2)
wrong = []
for dist, pinned in sorted(pins.items()):
    try:
        installed = version(dist)
    except PackageNotFoundError:
        installed = "not installed"
    if installed.split("+")[0] != pinned:
        wrong.append(f"{dist}: installed {installed}, pinned {pinned}")
if wrong:
    sys.exit("[setup] not the pinned versions: " + "; ".join(wrong))
print(f"[setup] ok: {len(pins)} pinned distributions at their pinned versions")
PY
}

if [[ "${1:-}" == "check" ]]; then
  check_imports && check_pins
  exit
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && check_imports 2>/dev/null \
    && check_pins >/dev/null 2>&1; then
  echo "[setup] environment in $venv is up to date"
  exit 0
fi

echo "[setup] installing into $venv"
"${pip[@]}" install -r requirements.txt

# detectron2: repack the sal-detectron2 wheel as pure Python (its _C binary is
# built for CPython 3.10 and can never load here; nothing this project uses needs it).
d2_name="${DETECTRON2_DIST%%==*}"; d2_version="${DETECTRON2_DIST##*==}"
if ! "$py" -c "import detectron2, importlib.metadata as m, sys; sys.exit(m.version('$d2_name') != '$d2_version')" 2>/dev/null; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.10 \
      --implementation cp -d "$work/dl" "$DETECTRON2_DIST"
  "$py" -m wheel unpack -d "$work/unpacked" "$work"/dl/*.whl
  root="$(echo "$work"/unpacked/*)"
  rm -f "$root"/detectron2/_C.*.so
  rm -rf "$root/tools"
  distinfo="$(echo "$root"/*.dist-info)"
  echo detectron2 > "$distinfo/top_level.txt"
  sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' \
      "$distinfo/WHEEL"
  # drop RECORD lines of the removed files so the wheel stays consistent
  sed -i -e '/detectron2\/_C\./d' -e '/^tools\//d' "$distinfo/RECORD"
  mkdir -p "$work/packed"
  "$py" -m wheel pack -d "$work/packed" "$root"
  "${pip[@]}" install --no-deps "$work"/packed/*.whl
fi

"${pip[@]}" install --no-deps "$PANOPTICAPI_DIST" "$CITYSCAPES_DIST"
"${pip[@]}" install --no-deps --no-build-isolation -e .

check_imports
check_pins
echo "$want" > "$stamp"
echo "[setup] done. Activate with: source ${venv}/bin/activate"
