#!/usr/bin/env bash
# A real round trip in a scratch folder: init, a demo dataset, push to a local-path remote,
# diff, change a file, pull into a second workspace. Run by scripts/quickstart.sh.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tether="$repo/.venv/bin/tether"
demo="${1:-$repo/demo}"
rm -rf "$demo"
mkdir -p "$demo/laptop" "$demo/cluster" "$demo/shared-disk"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

cd "$demo/laptop"
step "tether init"; "$tether" init
step "tether remote add nas $demo/shared-disk"; "$tether" remote add nas "$demo/shared-disk"
mkdir -p data/densegen/demo/_derived data/densegen/demo/_auxiliary
python3 - <<'PY'
import json, random
random.seed(7)
with open("data/densegen/demo/records.jsonl", "w") as f:
    for i in range(1000):
        f.write(json.dumps({"id": i, "seq": "".join(random.choice("ACGT") for _ in range(40))}) + "\n")
for i in range(20):
    with open(f"data/densegen/demo/_derived/score_{i:02d}.csv", "w") as f:
        f.write("id,score\n" + "".join(f"{j},{random.random():.6f}\n" for j in range(200)))
with open("data/densegen/demo/_auxiliary/params.json", "w") as f:
    json.dump({"temperature": 0.7, "model": "demo"}, f)
PY
step "tether ls"; "$tether" ls
step "tether diff densegen/demo nas   # preview: exit 1 means something differs"
"$tether" diff densegen/demo nas || true
step "tether push densegen/demo nas"; "$tether" push densegen/demo nas
step "tether diff densegen/demo nas   # exit 0: in sync"; "$tether" diff densegen/demo nas

cd "$demo/cluster"
step "(second workspace) tether init && tether remote add nas ... && tether pull densegen/demo nas"
"$tether" init >/dev/null
"$tether" remote add nas "$demo/shared-disk" >/dev/null
"$tether" pull densegen/demo nas
step "(second workspace) edit a derived file and push it back"
echo "0,0.999999" >> data/densegen/demo/_derived/score_00.csv
"$tether" push densegen/demo nas -y

cd "$demo/laptop"
step "(first workspace) tether diff densegen/demo nas"
"$tether" diff densegen/demo nas || true
step "(first workspace) tether pull densegen/demo nas -y"; "$tether" pull densegen/demo nas -y
step "compare both workspaces"
diff -r "$demo/laptop/data/densegen/demo" "$demo/cluster/data/densegen/demo" && echo "identical: the round trip holds"
step "the audit record of that pull (last line of .tether/audit.jsonl)"
tail -n 1 .tether/audit.jsonl | python3 -c '
import json, sys
r = json.load(sys.stdin)
keys = ("operation", "dataset", "remote", "state", "files", "bytes_transferred", "seconds", "verification")
print(json.dumps({k: r[k] for k in keys}, indent=2))'
printf '\nDone. The demo lives in %s; the README explains each command.\n' "$demo"
