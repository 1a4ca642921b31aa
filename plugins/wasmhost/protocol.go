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
// system and the CRI mounts, chrooted into it (so a module sees only its
// rootfs, whatever its paths or symlinks say), the pod's network namespace,
// and, where the cgroup hierarchy allows, the container's CPU cgroup. The
// container's linear memory comes from an allocator that enforces the
// container's and the pod's memory limits; growing past them kills the
// module and reports it OOM-killed.
//
// The daemon talks to the host with JSON-RPC (net/rpc) over a Unix socket
// that only the host's own user may use.
package wasmhost

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// ProtocolVersion is bumped on any incompatible change of the messages.
const ProtocolVersion = 1

// serviceName is the net/rpc service name of the host.
const serviceName = "Host"

// Mount is a file system the container sees: a rootfs mount as containerd
// hands it over (overlay, bind), or a CRI mount (bind, tmpfs).
type Mount struct {
	Type        string   `json:"type"`
	Source      string   `json:"source"`
	Destination string   `json:"destination,omitempty"`
	Options     []string `json:"options,omitempty"`
}

// Stdio names the FIFOs (or files) of a process's standard streams.
type Stdio struct {
	Stdin    string `json:"stdin,omitempty"`
	Stdout   string `json:"stdout,omitempty"`
	Stderr   string `json:"stderr,omitempty"`
	Terminal bool   `json:"terminal,omitempty"`
}

// User is a numeric user and its groups.
type User struct {
	UID            uint32   `json:"uid"`
	GID            uint32   `json:"gid"`
	AdditionalGids []uint32 `json:"additionalGids,omitempty"`
}

// Capabilities are sets of capability names ("CAP_CHOWN"...).
type Capabilities struct {
	Bounding    []string `json:"bounding,omitempty"`
	Effective   []string `json:"effective,omitempty"`
	Permitted   []string `json:"permitted,omitempty"`
	Inheritable []string `json:"inheritable,omitempty"`
}

// Module says where a container's Wasm module comes from.
type Module struct {
	// Path is a module file on the host (an image layer blob). When empty,
	// the module is Args[0] of the process, looked up inside the rootfs.
	Path string `json:"path,omitempty"`
	// Digest identifies Path's content ("sha256:..."), so a cached
	// compilation is used without reading the file.
	Digest string `json:"digest,omitempty"`
}

// Process is what runs: a module instance's arguments and environment.
type Process struct {
	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	Cwd  string   `json:"cwd,omitempty"`
	// User the module's file accesses are checked as (nil: root).
	User *User `json:"user,omitempty"`
	// Capabilities a root module keeps (nil: all); a module of another
	// user has none.
	Capabilities *Capabilities `json:"capabilities,omitempty"`
	// Stdio of the process.
	Stdio Stdio `json:"stdio"`
}

// Limits of a container. Zero means no limit.
type Limits struct {
	// MemoryBytes caps the container's linear memory.
	MemoryBytes int64 `json:"memoryBytes,omitempty"`
	// CPUQuota and CPUPeriod (microseconds) and CPUShares bound the CPU
	// time of the container's thread through its CPU cgroup.
	CPUQuota  int64  `json:"cpuQuota,omitempty"`
	CPUPeriod uint64 `json:"cpuPeriod,omitempty"`
	CPUShares uint64 `json:"cpuShares,omitempty"`
}

// PodRequest names a pod ("" for every pod).
type PodRequest struct {
	Pod string `json:"pod"`
}

// CreateRequest creates a container, ready to start.
type CreateRequest struct {
	// ID is unique on the node (the daemon uses namespace/pod/container).
	ID  string `json:"id"`
	Pod string `json:"pod"`
	// Rootfs mounts, mounted at RootfsDir in the container's own mount
	// namespace (never in the host's). Without them, RootfsDir is used as
	// it is.
	Rootfs    []Mount `json:"rootfs,omitempty"`
	RootfsDir string  `json:"rootfsDir"`
	Readonly  bool    `json:"readonly,omitempty"`
	// Mounts are the CRI mounts (bind and tmpfs; others are ignored).
	Mounts []Mount `json:"mounts,omitempty"`
	// NetNS is the pod's network namespace ("" for the host's).
	NetNS string `json:"netns,omitempty"`
	// Cgroup is the container's cgroup path (cgroupfs form), for its CPU
	// limits and accounting ("" for none).
	Cgroup  string  `json:"cgroup,omitempty"`
	Module  Module  `json:"module"`
	Process Process `json:"process"`
	Limits  Limits  `json:"limits"`
	// PodMemoryBytes caps the sum of the linear memory of the pod's
	// containers (0: none).
	PodMemoryBytes int64 `json:"podMemoryBytes,omitempty"`
	// Listen lists TCP addresses (host:port, in the pod's network) the
	// module gets as pre-opened listening sockets (fds 3, 4, ... after the
	// pre-opened directories).
	Listen []string `json:"listen,omitempty"`
}

// ExecRequest runs an additional module instance in a container.
type ExecRequest struct {
	ID      string  `json:"id"`
	ExecID  string  `json:"execID"`
	Process Process `json:"process"`
}

// Ref names a container, or an exec in it.
type Ref struct {
	ID     string `json:"id"`
	ExecID string `json:"execID,omitempty"`
}

// KillRequest signals a process.
type KillRequest struct {
	Ref
	Signal int `json:"signal"`
	// All signals the container's execs too.
	All bool `json:"all,omitempty"`
}

// UpdateRequest changes a container's limits.
type UpdateRequest struct {
	ID     string `json:"id"`
	Limits Limits `json:"limits"`
}

// Status of a process in the host.
type Status string

// Process statuses.
const (
	Created Status = "created"
	Running Status = "running"
	Stopped Status = "stopped"
)

// State of a process.
type State struct {
	ID     string `json:"id"`
	ExecID string `json:"execID,omitempty"`
	Pod    string `json:"pod,omitempty"`
	// Pid is the thread the process runs on (a host TID).
	Pid    int    `json:"pid"`
	Status Status `json:"status"`
	Exit   *Exit  `json:"exit,omitempty"`
}

// Exit is how a process ended.
type Exit struct {
	// Status follows containerd's convention: the exit code, or 128+signal
	// when killed (137 when killed for memory).
	Status int       `json:"status"`
	At     time.Time `json:"at"`
	// OOM is set when the module was killed for growing past a memory
	// limit.
	OOM bool `json:"oom,omitempty"`
	// Reason says why a module ended other than by exiting (a trap, a
	// limit).
	Reason string `json:"reason,omitempty"`
}

// Stats of a container (its init and execs).
type Stats struct {
	// MemoryBytes is the linear memory in use; MemoryLimit the limit that
	// applies (0: none). MemoryMax is the high-water mark.
	MemoryBytes uint64 `json:"memoryBytes"`
	MemoryMax   uint64 `json:"memoryMax"`
	MemoryLimit uint64 `json:"memoryLimit,omitempty"`
	// CPU time in nanoseconds.
	CPUUserNanos   uint64 `json:"cpuUserNanos"`
	CPUSystemNanos uint64 `json:"cpuSystemNanos"`
	// Throttling, when the container has a CPU cgroup.
	CPUPeriods          uint64 `json:"cpuPeriods,omitempty"`
	CPUThrottledPeriods uint64 `json:"cpuThrottledPeriods,omitempty"`
	CPUThrottledNanos   uint64 `json:"cpuThrottledNanos,omitempty"`
	OOMKills            uint64 `json:"oomKills,omitempty"`
}

// HelloReply identifies the host.
type HelloReply struct {
	Version int `json:"version"`
	Pid     int `json:"pid"`
	// Boot is a token that changes with every host process.
	Boot string `json:"boot"`
}

// HostStats are node-wide figures of the host.
type HostStats struct {
	Containers int `json:"containers"`
	Modules    int `json:"modules"` // compiled modules held in memory
	Pods       int `json:"pods"`
}

// Empty is an empty argument or reply.
type Empty struct{}

// Errors cross the RPC boundary as text; their containerd error class rides
// in a prefix so that the client can restore it.
var errClasses = []struct {
	prefix string
	err    error
}{
	{"not found: ", errdefs.ErrNotFound},
	{"invalid argument: ", errdefs.ErrInvalidArgument},
	{"failed precondition: ", errdefs.ErrFailedPrecondition},
	{"not implemented: ", errdefs.ErrNotImplemented},
	{"already exists: ", errdefs.ErrAlreadyExists},
	{"unavailable: ", errdefs.ErrUnavailable},
}

// encodeError flattens err for the wire, keeping its class.
func encodeError(err error) error {
	if err == nil {
		return nil
	}
	for _, c := range errClasses {
		if errors.Is(err, c.err) {
			return errors.New(c.prefix + err.Error())
		}
	}
	return err
}

// decodeError restores the class of an error that crossed the wire.
func decodeError(msg string) error {
	for _, c := range errClasses {
		if rest, ok := strings.CutPrefix(msg, c.prefix); ok {
			// The message already names the class; strip its repetition.
			rest = strings.TrimSuffix(rest, ": "+c.err.Error())
			return fmt.Errorf("%s: %w", rest, c.err)
		}
	}
	return errors.New(msg)
}
