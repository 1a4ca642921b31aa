// Package sandbox adapts a Kuasar kind of sandbox to containerd's
// sandbox.Controller, once for every kind, and registers it as an in-process
// plugin (io.containerd.sandbox.controller.v1.<id>).
//
// A kind implements Kind and Instance: how to build, start, stop and tear
// down one sandbox, and the task.Runtime that runs its containers. This
// package does the rest: the sandbox state machine and its records on disk,
// the per-sandbox task endpoint containerd connects to instead of a shim,
// Wait and Status as CRI expects them, and recovery after a restart.
package sandbox

import (
	"context"
	"encoding/json"
	"io"
	"time"

	"github.com/containerd/containerd/api/types"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// Kind is one kind of sandbox (namespaces, Wasm, application kernel, VM).
type Kind interface {
	// Create builds the isolation of a new sandbox without starting it. It
	// may record what it needs in sb.State. On error it must leave nothing
	// behind. The pod's files (hostname, hosts, resolv.conf) are written
	// before Create.
	Create(ctx context.Context, sb *Sandbox) (Instance, error)
	// Recover rebuilds the Instance of a sandbox recorded by a previous
	// daemon, from sb.State. On error it releases what it can of the
	// sandbox; the framework then removes its directory (and every mount
	// under it) and reports the sandbox, and its containers, ended.
	Recover(ctx context.Context, sb *Sandbox) (Instance, error)
}

// PodNamespaces is implemented by an Instance whose containers join
// namespaces of the pod on the node: the paths they join, as the pod's
// OCI spec names them for NRI plugins and other readers of the sandbox
// record.
type PodNamespaces interface {
	PodNamespaces() []specs.LinuxNamespace
}

// PortForwarder is implemented by an Instance whose pod's localhost is not
// its network namespace's on the node (a VM's): CRI's port-forward, which
// connects to localhost in that namespace, reaches the pod through the
// instance instead. It relays stream and the pod's localhost:port until
// either ends, then closes stream.
type PortForwarder interface {
	PortForward(ctx context.Context, port int32, stream io.ReadWriteCloser) error
}

// Reconciler is implemented by a kind that can find what a daemon killed
// in the middle of an operation left behind, which no record owns (a
// container created but not yet recorded, say). After recovery the
// framework calls Reconcile with every sandbox and container the records
// hold; the kind removes everything else of its own.
type Reconciler interface {
	Reconcile(ctx context.Context, owned Owned) error
}

// Owned is what the records of a controller hold.
type Owned struct {
	Sandboxes []*Sandbox
	// Containers of those sandboxes, by sandbox ID.
	Containers map[string][]*task.Container
}

// Instance is one sandbox of a kind.
type Instance interface {
	// Start makes the sandbox ready to run containers.
	Start(ctx context.Context) error
	// Runtime runs the sandbox's containers.
	Runtime() task.Runtime
	// Stop ends whatever of the sandbox still runs. Its containers have been
	// killed already. The sandbox stays inspectable until Shutdown.
	Stop(ctx context.Context) error
	// Shutdown releases everything the sandbox holds. It must be idempotent.
	Shutdown(ctx context.Context) error
	// Metrics returns the pod-level metrics (cgroup v1 or v2 metrics).
	Metrics(ctx context.Context) (*types.Metric, error)
	// Info adds kind-specific details to the sandbox's status info.
	Info() map[string]any
}

// Sandbox is what the framework knows of one sandbox, and records on disk.
type Sandbox struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	// Config is the CRI pod config (never nil; empty for non-CRI clients).
	Config      *runtime.PodSandboxConfig `json:"-"`
	NetNSPath   string                    `json:"netnsPath,omitempty"`
	Annotations map[string]string         `json:"annotations,omitempty"`
	CreatedAt   time.Time                 `json:"createdAt"`
	// Handler is the CRI runtime handler the pod was created with (the
	// controller's ID for clients other than CRI, and for sandboxes
	// recorded before it was kept): the handler label of its metrics.
	Handler string `json:"handler,omitempty"`

	// Dir is the sandbox's private state directory. The pod's files
	// (hostname, hosts, resolv.conf) are under it (PodFile).
	Dir string `json:"dir"`
	// ShmDir is the pod's shared /dev/shm, if its kind gives it one: the
	// framework mounts it into every container of a pod that does not use
	// the node's IPC namespace.
	ShmDir string `json:"shmDir,omitempty"`

	// State is the kind's own record of the sandbox.
	State json.RawMessage `json:"state,omitempty"`

	exit func(status uint32)
}

// Exited tells the framework that the sandbox ended on its own (a VM or a
// namespace holder died): it becomes NOTREADY and Wait returns.
func (sb *Sandbox) Exited(status uint32) {
	if sb.exit != nil {
		sb.exit(status)
	}
}

// HostNetwork reports whether the pod uses the node's network namespace.
func (sb *Sandbox) HostNetwork() bool {
	return sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions().GetNetwork() == runtime.NamespaceMode_NODE
}
