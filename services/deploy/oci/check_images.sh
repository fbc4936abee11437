#!/usr/bin/env bash
# Builds the OCI image layout of each daemon with constellation-oci (no container daemon), then
# checks it with standard OCI tools: skopeo reads the layout's config (entrypoint, non-root
# user), umoci unpacks it (verifying every digest), and the unpacked root filesystem runs the
# daemon under chroot as the non-root user: the image is complete (binary + libraries).
# Usage: check_images.sh <dir with the daemon binaries> <output dir>
set -euo pipefail
bin_dir=$1
out=$2
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' "$(dirname "$0")/../../../Cargo.toml" | head -1)
multiarch=/usr/lib/x86_64-linux-gnu
# libtss2-tctildr dlopens the TCTI module the TCTI string names: device (a node) and swtpm (local).
tctis=(--dlopen "$multiarch/libtss2-tcti-device.so.0" --dlopen "$multiarch/libtss2-tcti-swtpm.so.0")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
check() {
  local name=$1; shift
  "$bin_dir/constellation-oci" --binary "$bin_dir/$name" --name "$name" --tag "$tag" --out "$out/$name" "$@"
  local inspect
  inspect=$(skopeo inspect --config "oci:$out/$name:$tag")
  python3 - "$name" "$inspect" <<'PY'
import json, sys
name, config = sys.argv[1], json.loads(sys.argv[2])["config"]
assert config["Entrypoint"] == [f"/usr/local/bin/{name}"], config
assert config["User"] == "65532:65532", config
print(f"skopeo: {name}: entrypoint {config['Entrypoint'][0]}, user {config['User']}")
PY
  umoci unpack --image "$out/$name:$tag" "$work/$name" >/dev/null
  chroot --userspec=65532:65532 "$work/$name/rootfs" "/usr/local/bin/$name" --help >/dev/null
  echo "umoci: $name unpacked; --help runs in its root filesystem as 65532"
}
check constellation-joinservice --port 30090 --port 30091 "${tctis[@]}"
check constellation-keyservice --port 9001 --port 9002
check constellation-verify --port 30081 --port 30082 "${tctis[@]}"
# The TCTI modules load inside the image: the swtpm TCTI reaches the point of connecting.
out_text=$(chroot --userspec=65532:65532 "$work/constellation-verify/rootfs" /usr/local/bin/constellation-verify \
  --tcti swtpm:host=127.0.0.1,port=1 --health-listen 127.0.0.1:0 --listen 127.0.0.1:0 2>&1 & pid=$!; sleep 2; kill -TERM $pid; wait $pid || true)
echo "$out_text" | grep -q "Connection refused" || {
  echo "the swtpm TCTI module did not load (or connect) inside the image:"; echo "$out_text"; exit 1; }
echo "TCTI: the swtpm module loads inside the verify image (it reached connect())"
echo "images OK: $(ls "$out" | tr '\n' ' ')"
