#!/usr/bin/env bash
# RFC 6455 conformance of the cch client edge: Autobahn|Testsuite's fuzzing client against
# the echo-mode edge (cch/edge/conformance.py) at ws://127.0.0.1:PORT/v1/responses.
#
# Usage: scripts/conformance.sh
# Environment (all optional):
#   CCH_PYTHON              Python with cch installed   (default: .venv/bin/python, else python3)
#   CCH_CONFORMANCE_DIR     work dir: venvs, spec, logs, reports   (default: .conformance)
#   CCH_CONFORMANCE_PORT    edge port, 0 = a free one   (default: 0)
#   CCH_CONFORMANCE_CASES   comma-separated case patterns   (default: *)
#   CCH_CONFORMANCE_PERF    1 = also run the 9.* limits/performance cases   (default: 0)
#   CCH_CONFORMANCE_PY2     a Python 2.7 interpreter    (default: found on PATH or in pyenv)
#   CCH_CONFORMANCE_TIMEOUT seconds the fuzzing client may run   (default: 900)
#
# The suite (PyPI autobahntestsuite 25.10.1) is Python 2.7 only: it pins autobahn 0.10.9
# and Twisted 19.10. It goes in its own Python 2.7 virtualenv under the work dir, made by
# virtualenv 20.21 (the last release that creates 2.7 environments), itself in a small
# Python 3 venv there. Neither touches the project's .venv.
#
# Exit status: 0 when every case is OK, NON-STRICT or INFORMATIONAL; 1 otherwise; 2 when
# the run itself could not be made. Last line: the summary
#   conformance: N OK, M NON-STRICT, K INFORMATIONAL, F FAILED
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${CCH_CONFORMANCE_DIR:-$ROOT/.conformance}"
PORT="${CCH_CONFORMANCE_PORT:-0}"
CASES="${CCH_CONFORMANCE_CASES:-*}"
TIMEOUT="${CCH_CONFORMANCE_TIMEOUT:-900}"
ATS_VERSION="25.10.1"
VIRTUALENV_SPEC="virtualenv==20.21.1"

if [[ -n "${CCH_PYTHON:-}" ]]; then
    PY="$CCH_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi

die() { echo "conformance: $*" >&2; exit 2; }

mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
TOOLS="$WORK/venv-tools"     # Python 3: virtualenv
ATS="$WORK/venv-ats"         # Python 2.7: autobahntestsuite

find_py2() {
    local cand
    if [[ -n "${CCH_CONFORMANCE_PY2:-}" ]]; then
        echo "$CCH_CONFORMANCE_PY2"; return 0
    fi
    for cand in python2.7 python2; do
        # A pyenv shim exists even when its version is not selected: ask it to run.
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (2, 7)' >/dev/null 2>&1; then
            command -v "$cand"; return 0
        fi
    done
    local root="${PYENV_ROOT:-${HOME:-/root}/.pyenv}"
    for cand in "$root"/versions/2.7*/bin/python2.7 /usr/bin/python2.7 /usr/local/bin/python2.7; do
        if [[ -x "$cand" ]]; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

# --- the suite's own environment (made once, reused) -------------------------------------
if [[ ! -f "$ATS/.installed-$ATS_VERSION" ]]; then
    PY2="$(find_py2)" || die "autobahntestsuite needs Python 2.7 and none was found (set CCH_CONFORMANCE_PY2)"
    echo "conformance: installing autobahntestsuite $ATS_VERSION with $PY2 into $ATS" >&2
    if [[ ! -x "$TOOLS/bin/virtualenv" ]]; then
        rm -rf "$TOOLS"
        python3 -m venv "$TOOLS"
        "$TOOLS/bin/pip" install -q --disable-pip-version-check "$VIRTUALENV_SPEC" >"$WORK/install.log" 2>&1 \
            || { cat "$WORK/install.log" >&2; die "could not install $VIRTUALENV_SPEC"; }
    fi
    rm -rf "$ATS"
    "$TOOLS/bin/virtualenv" -q -p "$PY2" "$ATS" >>"$WORK/install.log" 2>&1 \
        || { cat "$WORK/install.log" >&2; die "could not create the Python 2.7 virtualenv"; }
    "$ATS/bin/pip" install -q --disable-pip-version-check "autobahntestsuite==$ATS_VERSION" >>"$WORK/install.log" 2>&1 \
        || { tail -50 "$WORK/install.log" >&2; die "could not install autobahntestsuite $ATS_VERSION"; }
    touch "$ATS/.installed-$ATS_VERSION"
fi

# --- the echo edge ------------------------------------------------------------------------
READY="$WORK/edge.json"
rm -f "$READY"
rm -rf "$WORK/reports"
EDGE_PID=""
cleanup() {
    if [[ -n "$EDGE_PID" ]] && kill -0 "$EDGE_PID" 2>/dev/null; then
        kill "$EDGE_PID" 2>/dev/null || true
        wait "$EDGE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
(cd "$ROOT" && exec "$PY" -m cch.edge.conformance --host 127.0.0.1 --port "$PORT" --ready-file "$READY" --verbose) \
    >"$WORK/edge.log" 2>&1 &
EDGE_PID=$!
for _ in $(seq 1 300); do
    [[ -f "$READY" ]] && break
    kill -0 "$EDGE_PID" 2>/dev/null || { cat "$WORK/edge.log" >&2; die "the echo edge exited before listening"; }
    sleep 0.1
done
[[ -f "$READY" ]] || { cat "$WORK/edge.log" >&2; die "the echo edge did not start listening in 30 s"; }

# --- the fuzzing client's spec ------------------------------------------------------------
# Excluded unless CCH_CONFORMANCE_PERF=1: 9.* (limits/performance: messages up to 16 MiB
# and long frame/chunk series, timed; they measure throughput, not protocol conformance).
# Excluded when the edge refuses permessage-deflate (EdgeFactory's
# perMessageCompressionAccept returns None, as the edge reads its ready file): 12.* and
# 13.*, which test that extension; with it refused every one of them is UNIMPLEMENTED.
"$PY" - "$READY" "$WORK/fuzzingclient.json" "$WORK/reports" "$CASES" "${CCH_CONFORMANCE_PERF:-0}" <<'EOF'
import json, sys
ready, spec_path, outdir, cases, perf = sys.argv[1:6]
edge = json.load(open(ready))
exclude = [] if perf == "1" else ["9.*"]
if not edge["compression"]:
    exclude += ["12.*", "13.*"]
spec = {
    "outdir": outdir,
    "servers": [{"agent": "cch-edge", "url": "ws://127.0.0.1:%d/v1/responses" % edge["port"]}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": exclude,
    "exclude-agent-cases": {},
}
json.dump(spec, open(spec_path, "w"), indent=2)
print("conformance: ws://127.0.0.1:%d/v1/responses, cases %s, excluding %s"
      % (edge["port"], ",".join(spec["cases"]), ",".join(exclude) or "nothing"), file=sys.stderr)
EOF

# --- the run --------------------------------------------------------------------------------
START=$SECONDS
set +e
(cd "$WORK" && timeout "$TIMEOUT" "$ATS/bin/wstest" -m fuzzingclient -s "$WORK/fuzzingclient.json") >"$WORK/wstest.log" 2>&1
RC=$?
set -e
echo "conformance: fuzzing client finished in $((SECONDS - START)) s (exit $RC); log $WORK/wstest.log" >&2
kill -0 "$EDGE_PID" 2>/dev/null || echo "conformance: warning: the echo edge died during the run (see $WORK/edge.log)" >&2
[[ -f "$WORK/reports/index.json" ]] || { tail -30 "$WORK/wstest.log" >&2; die "no report index (fuzzing client exit $RC)"; }

# --- the verdict ----------------------------------------------------------------------------
"$PY" - "$WORK/reports/index.json" "$WORK/summary.json" <<'EOF'
import json, sys
from collections import Counter, defaultdict

index = json.load(open(sys.argv[1]))
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
results = {}
for agent_cases in index.values():
    results.update(agent_cases)

def key(case_id):
    return tuple(int(p) for p in case_id.split("."))

by_group = defaultdict(Counter)
totals = Counter()
notable = []
for case_id in sorted(results, key=key):
    r = results[case_id]
    behavior = r["behavior"] if r["behavior"] in PASSING else "FAILED"
    totals[behavior] += 1
    by_group[case_id.split(".")[0]][behavior] += 1
    if r["behavior"] != "OK" or r["behaviorClose"] not in ("OK", "INFORMATIONAL"):
        notable.append((case_id, r["behavior"], r["behaviorClose"], r.get("remoteCloseCode")))

cols = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED")
print("%-6s %6s %11s %14s %7s" % (("group",) + cols), file=sys.stderr)
for group in sorted(by_group, key=int):
    c = by_group[group]
    print("%-6s %6d %11d %14d %7d" % ((group,) + tuple(c[k] for k in cols)), file=sys.stderr)
for case_id, behavior, close, code in notable:
    print("  case %-8s %-14s close %-16s remote close code %s" % (case_id, behavior, close, code), file=sys.stderr)

json.dump(
    {"totals": {k: totals[k] for k in cols}, "groups": {g: {k: c[k] for k in cols} for g, c in by_group.items()},
     "cases": {cid: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"],
                     "remoteCloseCode": r.get("remoteCloseCode")} for cid, r in results.items()}},
    open(sys.argv[2], "w"), indent=1, sort_keys=True,
)
print("conformance: %d OK, %d NON-STRICT, %d INFORMATIONAL, %d FAILED"
      % tuple(totals[k] for k in cols))
sys.exit(1 if totals["FAILED"] or not results else 0)
EOF
