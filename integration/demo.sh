#!/usr/bin/env bash
# make demo: start containerd-kuasar on its embedded scratch config, run a
# pod of every handler through crictl, show what each pod prints and what it
# costs in processes and memory, then clean up everything it started.
set -euo pipefail

BIN=${KUASAR_BIN_DIR:?run through make demo}
STOCK_BIN=${KUASAR_STOCK_BIN_DIR:-$(dirname "$BIN")/stock/bin}
CACHE=${KUASAR_CACHE_DIR:-/var/tmp/kuasar-cache}
REGISTRY=127.0.0.1:5000
DIR=$(mktemp -d /tmp/kuasar-demo-XXXXXX)
BRIDGE=kdemo0
GO_BIN=$(dirname "$(command -v go)") # the Wasm test module is built with Go
export PATH="$BIN:$STOCK_BIN:/usr/sbin:/usr/bin:/sbin:/bin:$GO_BIN"
CRICTL=(crictl --runtime-endpoint "unix://$DIR/containerd.sock" --image-endpoint "unix://$DIR/containerd.sock" --timeout 60s)
export CRI_CONFIG_FILE=/dev/null

pids=()
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
	set +e
	if [ -S "$DIR/containerd.sock" ]; then
		for p in $("${CRICTL[@]}" pods -q 2>/dev/null); do
			"${CRICTL[@]}" stopp "$p" >/dev/null 2>&1
			"${CRICTL[@]}" rmp "$p" >/dev/null 2>&1
		done
	fi
	keeper=$(cat "$DIR/keeper.pid" 2>/dev/null)
	wasmhost=$(cat "$DIR/wasmhost.pid" 2>/dev/null)
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	[ -n "$keeper" ] && kill "$keeper" 2>/dev/null
	[ -n "$wasmhost" ] && kill "$wasmhost" 2>/dev/null
	ip link del "$BRIDGE" 2>/dev/null
	for d in /sys/fs/cgroup/*/kuasar-demo /sys/fs/cgroup/kuasar-demo; do
		[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
	done
	grep " $DIR/" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
	# kuasar-vmm's template RAM, named after the daemon's state directory.
	rm -rf "/dev/shm/kuasar-vmm-$(printf %s "$DIR/state/io.containerd.sandbox.controller.v1.kuasar-vmm" | sha256sum | cut -c1-12)"
	rm -rf "$DIR"
}
trap cleanup EXIT

pss() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }

say "test images (built locally, served by a local registry on $REGISTRY)"
testimages -registry "$REGISTRY" -dir "$CACHE/registry" > "$DIR/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "images pushed" "$DIR/registry.log" && break; sleep 0.2; done
grep "images pushed" "$DIR/registry.log" || { cat "$DIR/registry.log"; exit 1; }

say "containerd-kuasar on its embedded default config, root $DIR"
containerd-kuasar --version
containerd-kuasar scratch --dir "$DIR" --mirror "$REGISTRY" --bridge "$BRIDGE" --subnet 10.251.0.0/24 --log-level warn > "$DIR/daemon.log" 2>&1 &
pids+=($!)
DAEMON=$!
for _ in $(seq 100); do "${CRICTL[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"${CRICTL[@]}" version
"${CRICTL[@]}" pull docker.io/library/busybox:kuasar >/dev/null
"${CRICTL[@]}" pull registry.k8s.io/pause:3.10.2 >/dev/null
"${CRICTL[@]}" pull docker.io/library/wasm-app:layer >/dev/null

declare -A POD CTR
for handler in kuasar-runc kuasar-wasm kuasar-vmm kuasar-gvisor runc; do
	name=demo-${handler/-/}
	cat > "$DIR/$name-pod.json" <<JSON
{"metadata": {"name": "$name", "namespace": "demo", "uid": "$name-uid"},
 "hostname": "$name", "log_directory": "$DIR/logs/$name",
 "linux": {"cgroup_parent": "/kuasar-demo/$name",
           "security_context": {"namespace_options": {"pid": 1}}}}
JSON
	cat > "$DIR/$name-ctr.json" <<JSON
{"metadata": {"name": "hello"}, "image": {"image": "docker.io/library/busybox:kuasar"},
 "command": ["sh", "-c", "echo hello from \$(hostname), handler $handler; echo my ip: \$(ip -o -4 addr show eth0 | awk '{print \$4}'); echo my processes:; ps -o pid,args; sleep 3600"],
 "log_path": "hello.log",
 "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
	if [ "$handler" = kuasar-wasm ]; then
		cat > "$DIR/$name-ctr.json" <<JSON
{"metadata": {"name": "hello"}, "image": {"image": "docker.io/library/wasm-app:layer"},
 "args": ["demo", "a WASI module from an OCI image, handler $handler"], "log_path": "hello.log", "linux": {}}
JSON
	fi
	say "pod with runtime handler $handler"
	start=$(date +%s%N)
	POD[$handler]=$("${CRICTL[@]}" runp --runtime "$handler" "$DIR/$name-pod.json")
	CTR[$handler]=$("${CRICTL[@]}" create "${POD[$handler]}" "$DIR/$name-ctr.json" "$DIR/$name-pod.json")
	"${CRICTL[@]}" start "${CTR[$handler]}" >/dev/null
	end=$(date +%s%N)
	echo "runp + create + start (crictl, 3 processes): $(( (end - start) / 1000000 )) ms"
	[ "$handler" = kuasar-wasm ] && echo "(the node's first Wasm pod: the Wasm host starts and compiles the module; later pods of the image reuse it)"
	[ "$handler" = kuasar-gvisor ] && echo "(the pod is one gVisor sandbox: ps in it shows gVisor's view, with kuasar-gvisor's idle root container)"
	[ "$handler" = kuasar-vmm ] && echo "(the node's first VM pod of its size: a template VM boots once and is saved; later pods are clones of it)" &&
		"${CRICTL[@]}" inspectp "${POD[$handler]}" | grep -oE '"(accel|boot|vcpus|memoryMiB)": *("[^"]*"|[0-9]+)' | tr '\n' ' ' && echo
	sleep 1
	"${CRICTL[@]}" logs "${CTR[$handler]}"
done

say "pods and containers"
"${CRICTL[@]}" pods
"${CRICTL[@]}" ps

say "what each pod costs (processes outside the workload, PSS)"
keeper=$(pgrep -f "kuasar-keeper --socket $DIR/" || true)
echo "$keeper" > "$DIR/keeper.pid"
wasmhost=$(pgrep -f "kuasar-wasm-host --socket $DIR/" || true)
echo "$wasmhost" > "$DIR/wasmhost.pid"
for handler in kuasar-runc kuasar-wasm kuasar-vmm kuasar-gvisor runc; do
	if [ "$handler" = kuasar-vmm ]; then
		vm=$("${CRICTL[@]}" inspectp -o go-template --template '{{.kuasar.vmPid}}' "${POD[$handler]}")
		echo "-- $handler pod ${POD[$handler]:0:12}"
		printf '   %-8s %-12s %-20s PSS %6s kB\n' "$vm" "$(cat /proc/$vm/comm)" "the VM (isolation)" "$(pss $vm)"
		echo "   the pod's processes run in the guest; on the node, only its hypervisor"
		echo "   management processes for this pod: 0 kB PSS"
		continue
	elif [ "$handler" = kuasar-gvisor ]; then
		echo "-- $handler pod ${POD[$handler]:0:12}"
		root="$DIR/state/io.containerd.sandbox.controller.v1.kuasar-appkernel"
		for p in $(ls /proc | grep -E '^[0-9]+$'); do
			args=$({ tr '\0' ' ' < /proc/$p/cmdline; } 2>/dev/null) || continue
			case "$args" in
			runsc-sandbox*"$root"*"${POD[$handler]}"*) printf '   %-8s %-12s %-20s PSS %6s kB\n' "$p" sentry "gVisor (isolation)" "$(pss $p)" ;;
			runsc-gofer*"$root"*) grep -q -e "${POD[$handler]}" -e "${CTR[$handler]}" /proc/$p/cmdline && printf '   %-8s %-12s %-20s PSS %6s kB\n' "$p" gofer "gVisor (isolation)" "$(pss $p)" ;;
			esac
		done
		echo "   the workload runs inside the sentry; no shim, no pause, no runsc left running"
		echo "   management processes for this pod: 0 kB PSS"
		continue
	fi
	if [ "$handler" = kuasar-wasm ]; then
		tid=$("${CRICTL[@]}" inspect -o go-template --template '{{.info.pid}}' "${CTR[$handler]}")
		mem=$("${CRICTL[@]}" stats -o json "${CTR[$handler]}" | tr -d ' \n' | grep -o '"workingSetBytes":{"value":"[0-9]*"' | grep -o '[0-9][0-9]*' || echo 0)
		echo "-- $handler pod ${POD[$handler]:0:12}"
		printf '   %-8s %-12s %-20s linear memory %6s kB\n' "$tid" "(a thread)" "workload" "$((mem / 1024))"
		echo "   the module runs on thread $tid of the node's kuasar-wasm-host; no process of its own"
		echo "   management processes for this pod: 0 kB PSS"
		continue
	fi
	wpid=$("${CRICTL[@]}" inspect -o go-template --template '{{.info.pid}}' "${CTR[$handler]}")
	netns=$(readlink "/proc/$wpid/ns/net")
	echo "-- $handler pod ${POD[$handler]:0:12}"
	total=0
	for p in $(ls /proc | grep -E '^[0-9]+$'); do
		[ "$(readlink /proc/$p/ns/net 2>/dev/null)" = "$netns" ] || continue
		comm=$(cat /proc/$p/comm 2>/dev/null) || continue
		kind=workload
		[ "$comm" = pause ] && kind="pause (management)" && total=$((total + $(pss $p)))
		printf '   %-8s %-12s %-20s PSS %6s kB\n' "$p" "$comm" "$kind" "$(pss $p)"
	done
	for s in $(pgrep -f "containerd-shim-runc-v2 .*-address $DIR/containerd.sock" || true); do
		if grep -q "${POD[$handler]}" "/proc/$s/cmdline" 2>/dev/null; then
			printf '   %-8s %-12s %-20s PSS %6s kB\n' "$s" shim "shim (management)" "$(pss $s)"
			total=$((total + $(pss $s)))
		fi
	done
	echo "   management processes for this pod: ${total} kB PSS"
done
echo "-- node-wide, shared by every pod:"
printf '   %-8s %-20s PSS %6s kB\n' "$DAEMON" containerd-kuasar "$(pss $DAEMON)"
[ -n "$keeper" ] && printf '   %-8s %-20s PSS %6s kB  (parent of kuasar workloads, 1 per node)\n' "$keeper" kuasar-keeper "$(pss $keeper)"
[ -n "$wasmhost" ] && printf '   %-8s %-20s PSS %6s kB  (runs every Wasm module of the node, linear memory included)\n' "$wasmhost" kuasar-wasm-host "$(pss $wasmhost)"

say "cleaning up"
