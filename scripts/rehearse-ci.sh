#!/usr/bin/env bash
# Rehearse CI as a machine that never ran it: clone the current commit into a temporary directory
# beside a link to ../shared, make every cache cold, run `CI=true bash .ci/run`, print the summary.
#
#   scripts/rehearse-ci.sh [--load] [--move] [--keep] [--shared DIR] [--ref REV]
#
#   --load        run it under `stress-ng --cpu 2` (as CI machines are: every core busy)
#   --move        move the real caches away for the run and put them back afterwards, instead of
#                 pointing everything at empty caches (the default); only on a machine nobody else
#                 is using: a concurrent test run or image build would lose its cache mid-way
#   --keep        keep the clone and its cold caches (default: removed; the log is always kept)
#   --shared DIR  third-party test files (default: ../shared of this checkout, else of the main one)
#   --ref REV     what to clone (default HEAD: commit first, uncommitted changes are not rehearsed)
#
# Cold means: no pip cache, no npm cache, no apt archives, no nspawn rootfs or wheelhouse
# ($LASTMILE_TEST_CACHE, $LASTMILE_IMAGE_CACHE), no .venv, no node_modules. Installed apt packages
# stay installed: the rehearsal cannot uninstall what other work on this machine needs.
# Exit status: that of .ci/run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

load=0 move=0 keep=0 shared="" ref=HEAD
while [ $# -gt 0 ]; do
  case $1 in
    --load) load=1 ;;
    --move) move=1 ;;
    --keep) keep=1 ;;
    --shared) shared=$2; shift ;;
    --ref) ref=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "rehearse-ci: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$shared" ]; then
  shared=$repo/../shared
  # a worktree (…/wt/NAME) has no ../shared: take the main checkout's
  [ -d "$shared" ] || shared=$(dirname "$(dirname "$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir)")")/shared
fi
[ -d "$shared" ] || { echo "rehearse-ci: no third-party files at $shared (--shared DIR)" >&2; exit 2; }
shared=$(cd "$shared" && pwd)
commit=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] || [ "$ref" != HEAD ] \
  || echo "rehearse-ci: note: uncommitted changes are not part of the rehearsal"

work=$(mktemp -d /var/tmp/lastmile-rehearsal.XXXXXX)
log=/var/tmp/lastmile-rehearsal-$(date +%Y%m%d-%H%M%S)-${commit:0:8}.log
cold=$work/cold
moved=$work/moved
mkdir -p "$cold" "$moved"
stress_pid=""
moved_paths=()

# --move: the caches a fresh machine would not have, moved aside and restored on exit.
move_aside() {
  local path=$1 name
  name=$(echo "$path" | tr / _)
  [ -e "$path" ] || return 0
  mv "$path" "$moved/$name"
  moved_paths+=("$path")
  echo "rehearse-ci: moved $path aside"
}
restore() {
  local path name
  for path in ${moved_paths[@]+"${moved_paths[@]}"}; do
    name=$(echo "$path" | tr / _)
    rm -rf "$path"
    mv "$moved/$name" "$path"
    echo "rehearse-ci: restored $path"
  done
  moved_paths=()
}

cleanup() {
  [ -n "$stress_pid" ] && kill "$stress_pid" 2>/dev/null && wait "$stress_pid" 2>/dev/null
  restore
  # a killed run may leave the nspawn test's overlay mounted under the clone
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  if [ "$keep" = 1 ]; then
    echo "rehearse-ci: kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$move" = 1 ]; then
  for path in "${PIP_CACHE_DIR:-$HOME/.cache/pip}" "${LASTMILE_TEST_CACHE:-$HOME/.cache/lastmile-test}" \
              "${LASTMILE_IMAGE_CACHE:-$HOME/.cache/lastmile-image}" "$HOME/.npm"; do
    move_aside "$path"
  done
  if [ -d /var/cache/apt/archives ]; then
    move_aside /var/cache/apt/archives
    mkdir -p /var/cache/apt/archives/partial
  fi
else
  # Empty caches in place of the real ones: the same cold start, and nobody else is disturbed.
  export PIP_CACHE_DIR=$cold/pip LASTMILE_TEST_CACHE=$cold/lastmile-test \
         LASTMILE_IMAGE_CACHE=$cold/lastmile-image npm_config_cache=$cold/npm XDG_CACHE_HOME=$cold/xdg
  mkdir -p "$cold/apt-archives/partial"
  printf 'Dir::Cache::Archives "%s/";\n' "$cold/apt-archives" > "$cold/apt.conf"
  export APT_CONFIG=$cold/apt.conf
fi

git clone -q --no-hardlinks "$repo" "$work/lastmile"
git -C "$work/lastmile" checkout -q --detach "$commit"
ln -s "$shared" "$work/shared"  # the tests read ../shared

if [ "$load" = 1 ]; then
  command -v stress-ng >/dev/null || { echo "rehearse-ci: stress-ng missing (scripts/setup.sh --test)" >&2; exit 2; }
  stress-ng --cpu 2 --timeout 6h >/dev/null 2>&1 &
  stress_pid=$!
fi

echo "rehearse-ci: ${commit:0:12} in $work/lastmile, cold caches ($([ "$move" = 1 ] && echo moved || echo empty))," \
     "$([ "$load" = 1 ] && echo "under stress-ng --cpu 2" || echo "no extra load"); log $log"
began=$SECONDS
rc=0
(cd "$work/lastmile" && CI=true bash .ci/run) > "$log" 2>&1 || rc=$?
took=$((SECONDS - began))

echo "---- summary ($log)"
grep -E '^ci: stage |^test\.sh: |^fetch-test-assets: |^nspawn timings|^setup: installing|^(FAILED|ERROR) |^[0-9]+ (passed|failed|error|skipped)|^=+ .*(passed|failed|error).* in ' "$log" \
  | cut -c1-300 || true
echo "rehearse-ci: .ci/run $([ "$rc" = 0 ] && echo PASSED || echo "FAILED ($rc)") in $((took / 60)) min $((took % 60)) s"
exit "$rc"
