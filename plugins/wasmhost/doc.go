// Package wasmhost is the node-wide WebAssembly host of containerd-kuasar
// and the daemon's client of it.
//
// Wasm containers of the kuasar-wasm sandbox run as module instances inside
// one long-lived process per node, kuasar-wasm-host, not one process per
// pod or container: compiled modules are shared by every instance of the
// same image, so a running Wasm pod costs little more than its own linear
// memory. The host is not the daemon, so Wasm workloads outlive a restart of
// containerd-kuasar, as the workloads of every other kind do.
//
// Each container runs on an OS thread of its own, which the host turns into
// a small container: a private mount namespace with the image's root file
// system and the CRI mounts, pivoted into (so a module sees only its
// rootfs, whatever its paths or symlinks say), the pod's network namespace,
// the container's credentials and, where the cgroup hierarchy allows, the
// container's CPU cgroup. The container's linear memory comes from an
// allocator that enforces the container's and the pod's memory limits;
// growing past them kills the module and reports it OOM-killed.
//
// The daemon talks to the host with ttrpc (package api) over a Unix socket
// that only the host's own user may use; errors keep their errdefs class
// across it (errgrpc), and a request's deadline bounds the host's work.
package wasmhost

// ProtocolVersion is bumped on any incompatible change of the API.
const ProtocolVersion = 2
