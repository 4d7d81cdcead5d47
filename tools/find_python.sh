#!/usr/bin/env bash
# Prints the first of the named interpreters that runs here, best first:
#
#   tools/find_python.sh 3.12 3.13 3.11     (versions: pythonX.Y on the PATH, else pyenv's newest X.Y)
#   tools/find_python.sh python3 /usr/bin/python3.11     (commands or paths, as given)
#
# When it is not the first one named, a line on stderr says which is used instead; when none
# runs, it says so and exits 2.
set -uo pipefail

resolve() {
  local want=$1
  if [[ ! "$want" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
    "$want" -c "" 2>/dev/null && command -v "$want"
    return
  fi
  if "python$want" -c "" 2>/dev/null; then command -v "python$want"; return; fi
  # pyenv keeps versions that are not on the PATH unless selected: take the newest X.Y it has
  command -v pyenv >/dev/null 2>&1 || return 1
  local version
  version=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.|$)" | sort -V | tail -1)
  [ -n "$version" ] || return 1
  local python
  python="$(pyenv root)/versions/$version/bin/python$want"
  [ -x "$python" ] || python="$(pyenv root)/versions/$version/bin/python"
  "$python" -c "" 2>/dev/null && echo "$python"
}

for want in "$@"; do
  if found=$(resolve "$want") && [ -n "$found" ]; then
    [ "$want" = "$1" ] || echo "[unigen] python $1 is not on this machine: using $found instead" >&2
    echo "$found"
    exit 0
  fi
done
echo "[unigen] none of: $* runs on this machine (install one, e.g. with pyenv)" >&2
exit 2
