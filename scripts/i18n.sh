#!/usr/bin/env bash
# The console's gettext catalog (Babel): extract the strings, merge them into zh_CN, compile.
#   scripts/i18n.sh            extract + update + compile (after changing page strings)
#   scripts/i18n.sh compile    compile only (after translating in the .po)
# The compiled .mo is committed: an install from the repository needs no build step.
set -euo pipefail
cd "$(dirname "$0")/.."
pybabel=.venv/bin/pybabel
dir=lastmile/console/locale
if [ "${1:-}" != "compile" ]; then
  "$pybabel" extract -w 120 -F lastmile/console/babel.cfg -k _ -k gettext -k ngettext:1,2 -k N_ \
    --no-location --sort-output --project=lastmile --copyright-holder="Lastmile" -o "$dir/console.pot" .
  if [ -f "$dir/zh_CN/LC_MESSAGES/console.po" ]; then
    "$pybabel" update -D console -i "$dir/console.pot" -d "$dir" -l zh_CN --no-fuzzy-matching --ignore-obsolete -w 120
  else
    "$pybabel" init -D console -i "$dir/console.pot" -d "$dir" -l zh_CN
  fi
fi
"$pybabel" compile -D console -d "$dir" -l zh_CN --statistics
