// Package sentry talks to a running gVisor sandbox through its control
// server: the urpc socket every sentry serves in runsc's root directory
// (runsc-<sandbox id>.sock). kuasar-gvisor uses it in place of a management
// process per pod or container: waits for the exits of containers and
// execs, execs, signals, process lists and statistics are calls on that
// socket, made from the daemon. The calls speak urpc's protocol (a JSON
// call, descriptors alongside, and a JSON result) with this package's own
// reader: a sentry is untrusted (a container may escape into it), and its
// replies are bounded (maxReply) where urpc's client decodes without end.
//
// The argument and result types mirror those of the pinned gVisor
// (runsc/boot's containerManager and pkg/sentry/control): urpc encodes them
// as JSON, so only their field names and types matter. Importing gVisor's
// own types would link the whole sentry into the daemon.
package sentry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/unet"
	"gvisor.dev/gvisor/pkg/urpc"
)

// Methods of the sentry's container manager (runsc/boot/controller.go).
const (
	methodWait       = "containerManager.Wait"
	methodWaitPID    = "containerManager.WaitPID"
	methodExecute    = "containerManager.ExecuteAsync"
	methodSignal     = "containerManager.Signal"
	methodEvent      = "containerManager.Event"
	methodProcesses  = "containerManager.Processes"
	methodDestroySub = "containerManager.DestroySubcontainer"
	methodState      = "containerManager.ContainerRuntimeState"
	methodPortFwd    = "containerManager.PortForward"
)

// SocketPath is where runsc puts the control socket of sandbox id, under
// its root directory.
func SocketPath(root, id string) string {
	return filepath.Join(root, "runsc-"+id+".sock")
}

// Client calls one sandbox's control server. Each call uses a connection
// of its own, so that calls that block (Wait, WaitPID) do not hold up the
// others.
type Client struct {
	path string
}

// New returns a client of the control socket at path.
func New(path string) *Client { return &Client{path: path} }

// Path is the control socket's path.
func (c *Client) Path() string { return c.path }

// dial connects to the socket. A path too long for a Unix socket address
// (runsc's root and a 64-character sandbox ID often are) is reached
// through a descriptor of it, as runsc itself does.
func (c *Client) dial() (*unet.Socket, error) {
	addr := c.path
	if len(addr) >= len(unix.RawSockaddrUnix{}.Path) {
		fd, err := unix.Open(addr, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, c.connError(err)
		}
		defer unix.Close(fd)
		addr = fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	s, err := unet.Connect(addr, false)
	if err != nil {
		return nil, c.connError(err)
	}
	return s, nil
}

// ErrGone marks a call that found no sandbox to answer it: the socket is
// not there or nobody listens on it (the sentry has exited).
var ErrGone = errors.New("the sandbox's control server is gone")

func (c *Client) connError(err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("%w (%s): %w", ErrGone, c.path, errdefs.ErrNotFound)
	}
	return fmt.Errorf("connecting to the sandbox's control server %s: %w", c.path, err)
}

// call makes one call on a connection of its own, abandoned when ctx is
// done.
func (c *Client) call(ctx context.Context, method string, arg, result any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s, err := c.dial()
	if err != nil {
		return err
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		select {
		case <-ctx.Done():
			// Wakes a call blocked reading the reply.
			s.Close()
		case <-done:
		}
	}()
	err = roundTrip(s, method, arg, result)
	close(done)
	<-stopped
	s.Close()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return classify(method, err)
	}
	return nil
}

// maxReply bounds a reply of the sentry (a process list of a few thousand
// processes is well under it).
const maxReply = 4 << 20

// errReplyTooLarge is a reply past maxReply.
var errReplyTooLarge = fmt.Errorf("the sandbox's reply is larger than %d bytes: %w", maxReply, errdefs.ErrResourceExhausted)

// roundTrip sends one urpc call on s, with the files of an ExecArgs as
// descriptors, and decodes its result into result.
func roundTrip(s *unet.Socket, method string, arg, result any) error {
	data, err := json.Marshal(struct {
		Method string `json:"method"`
		Arg    any    `json:"arg"`
	}{method, arg})
	if err != nil {
		return fmt.Errorf("encoding the call: %w", err)
	}
	var files []*os.File
	switch a := arg.(type) {
	case *ExecArgs:
		files = a.Files
	case *portForwardArgs:
		files = a.Files
	}
	w := s.Writer(true)
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		w.PackFDs(fds...)
	}
	for n := 0; n < len(data); {
		cur, err := w.WriteVec([][]byte{data[n:]})
		if n == 0 && cur > 0 {
			w.PackFDs() // the descriptors went with the first bytes
		}
		n += cur
		if err != nil {
			return fmt.Errorf("sending the call: %w", err)
		}
	}
	runtime.KeepAlive(files)
	// Descriptors the sentry might send back are not received (a plain
	// read drops them): no call here takes any.
	lr := &io.LimitedReader{R: s, N: maxReply}
	var reply struct {
		Success bool            `json:"success"`
		Err     string          `json:"err"`
		Result  json.RawMessage `json:"result"`
	}
	if err := json.NewDecoder(lr).Decode(&reply); err != nil {
		if lr.N <= 0 {
			return errReplyTooLarge
		}
		return fmt.Errorf("reading the reply: %w", err)
	}
	if !reply.Success {
		return urpc.RemoteError{Message: reply.Err}
	}
	if result != nil && len(reply.Result) > 0 {
		if err := json.Unmarshal(reply.Result, result); err != nil {
			return fmt.Errorf("decoding the result: %v: %w", err, errdefs.ErrUnknown)
		}
	}
	return nil
}

// classify turns an error of a call into an errdefs class.
func classify(method string, err error) error {
	if errors.Is(err, errReplyTooLarge) {
		return fmt.Errorf("%s: %w", method, err)
	}
	var remote urpc.RemoteError
	if !errors.As(err, &remote) {
		// The connection broke: the sentry went away during the call.
		return fmt.Errorf("%s: %w: %v: %w", method, ErrGone, err, errdefs.ErrUnavailable)
	}
	msg := remote.Message
	switch {
	case strings.Contains(msg, "no such process"), strings.Contains(msg, "not found"),
		strings.Contains(msg, "doesn't exist"), strings.Contains(msg, "does not exist"),
		strings.Contains(msg, "has stopped"):
		return fmt.Errorf("%s: %s: %w", method, msg, errdefs.ErrNotFound)
	case strings.Contains(msg, "not started"):
		return fmt.Errorf("%s: %s: %w", method, msg, errdefs.ErrFailedPrecondition)
	}
	return fmt.Errorf("%s: %s: %w", method, msg, errdefs.ErrUnknown)
}

// Wait blocks until the init process of container cid exits and returns
// its wait status. A container that exited already answers at once, for as
// long as it is not destroyed.
func (c *Client) Wait(ctx context.Context, cid string) (unix.WaitStatus, error) {
	var ws uint32
	err := c.call(ctx, methodWait, &cid, &ws)
	return unix.WaitStatus(ws), err
}

// waitPIDArgs mirrors boot.WaitPIDArgs.
type waitPIDArgs struct {
	PID int32
	CID string
}

// WaitPID blocks until process pid (as Exec returned it) of container cid
// exits and returns its wait status. The sentry forgets the process once
// it has answered.
func (c *Client) WaitPID(ctx context.Context, cid string, pid int32) (unix.WaitStatus, error) {
	var ws uint32
	err := c.call(ctx, methodWaitPID, &waitPIDArgs{PID: pid, CID: cid}, &ws)
	return unix.WaitStatus(ws), err
}

// Capabilities mirrors auth.TaskCapabilities: capability bit sets.
type Capabilities struct {
	PermittedCaps   uint64
	InheritableCaps uint64
	EffectiveCaps   uint64
	BoundingCaps    uint64
	AmbientCaps     uint64
}

// ExecArgs mirrors control.ExecArgs: a process to start in a container.
type ExecArgs struct {
	Filename         string        `json:"filename"`
	Argv             []string      `json:"argv"`
	Envv             []string      `json:"envv"`
	WorkingDirectory string        `json:"wd"`
	KUID             uint32        `json:"KUID"`
	KGID             uint32        `json:"KGID"`
	ExtraKGIDs       []uint32      `json:"ExtraKGIDs"`
	NoNewPrivileges  bool          `json:"NoNewPrivileges"`
	Capabilities     *Capabilities `json:"Capabilities"`
	// StdioIsPty says that the files for 0, 1 and 2 are a host terminal.
	StdioIsPty  bool `json:"StdioIsPty"`
	SupportTTYs bool `json:"SupportTTYs"`
	// Files are donated to the process, as descriptors GuestFDs.
	urpc.FilePayload
	GuestFDs    []int  `json:"GuestFDs"`
	ContainerID string `json:"ContainerID"`
}

// Exec starts a process in a container and returns its pid, which names it
// for WaitPID and Signal. The files of args are sent to the sandbox; the
// caller keeps (and closes) its own copies.
func (c *Client) Exec(ctx context.Context, args *ExecArgs) (int32, error) {
	if len(args.GuestFDs) != len(args.Files) {
		return 0, fmt.Errorf("exec: %d files for %d descriptors: %w", len(args.Files), len(args.GuestFDs), errdefs.ErrInvalidArgument)
	}
	var pid int32
	err := c.call(ctx, methodExecute, args, &pid)
	return pid, err
}

// SignalMode mirrors boot.SignalDeliveryMode.
type SignalMode int

// Signal delivery modes.
const (
	// ToProcess signals one process (pid), or the container's init (pid 0).
	ToProcess SignalMode = iota
	// ToAll signals every process of the container.
	ToAll
	// ToForeground signals the foreground process group of the terminal
	// of process pid (or of the init).
	ToForeground
)

// signalArgs mirrors boot.SignalArgs.
type signalArgs struct {
	CID   string
	Signo int32
	PID   int32
	Mode  SignalMode
}

// Signal sends sig to processes of container cid, as mode says.
func (c *Client) Signal(ctx context.Context, cid string, pid int32, sig unix.Signal, mode SignalMode) error {
	return c.call(ctx, methodSignal, &signalArgs{CID: cid, Signo: int32(sig), PID: pid, Mode: mode}, nil)
}

// Destroy kills what runs of container cid and forgets it (its exit status
// included).
func (c *Client) Destroy(ctx context.Context, cid string) error {
	return c.call(ctx, methodDestroySub, &cid, nil)
}

// Process mirrors control.Process: one process of a container, as the
// sandbox's kernel knows it.
type Process struct {
	UID     uint32  `json:"uid"`
	PID     int32   `json:"pid"`
	PPID    int32   `json:"ppid"`
	PGID    int32   `json:"pgid"`
	Threads []int32 `json:"threads"`
	C       int32   `json:"c"`
	TTY     string  `json:"tty"`
	STime   string  `json:"stime"`
	Time    string  `json:"time"`
	Cmd     string  `json:"cmd"`
}

// Processes lists the processes of container cid (pids of the sandbox's
// root PID namespace).
func (c *Client) Processes(ctx context.Context, cid string) ([]Process, error) {
	var out []Process
	err := c.call(ctx, methodProcesses, &cid, &out)
	return out, err
}

// MemoryEntry mirrors boot.MemoryEntry.
type MemoryEntry struct {
	Limit   uint64 `json:"limit"`
	Usage   uint64 `json:"usage,omitempty"`
	Max     uint64 `json:"max,omitempty"`
	Failcnt uint64 `json:"failcnt"`
}

// Stats mirrors boot.Stats: what the sandbox's kernel accounts to one
// container (its own cgroups, not the host's).
type Stats struct {
	CPU struct {
		Usage struct {
			Kernel uint64   `json:"kernel,omitempty"`
			User   uint64   `json:"user,omitempty"`
			Total  uint64   `json:"total,omitempty"`
			PerCPU []uint64 `json:"percpu,omitempty"`
		} `json:"usage"`
	} `json:"cpu"`
	Memory struct {
		Cache uint64            `json:"cache,omitempty"`
		Usage MemoryEntry       `json:"usage,omitempty"`
		Swap  MemoryEntry       `json:"swap,omitempty"`
		Raw   map[string]uint64 `json:"raw,omitempty"`
	} `json:"memory"`
	Pids struct {
		Current uint64 `json:"current,omitempty"`
		Limit   uint64 `json:"limit,omitempty"`
	} `json:"pids"`
	NetworkInterfaces []*NetworkInterface `json:"network_interfaces"`
}

// NetworkInterface mirrors boot.NetworkInterface: the counters of one
// interface of the sandbox's network stack.
type NetworkInterface struct {
	Name      string
	RxBytes   uint64
	RxPackets uint64
	RxErrors  uint64
	RxDropped uint64
	TxBytes   uint64
	TxPackets uint64
	TxErrors  uint64
	TxDropped uint64
}

// EventOut mirrors boot.EventOut.
type EventOut struct {
	Event struct {
		Type string `json:"type"`
		ID   string `json:"id"`
		Data Stats  `json:"data"`
	} `json:"event"`
	// ContainerUsage is the CPU time (ns) of every container, by ID.
	ContainerUsage map[string]uint64 `json:"containerUsage"`
}

// Event returns the statistics of container cid (`runsc events --stats`).
func (c *Client) Event(ctx context.Context, cid string) (*EventOut, error) {
	var out EventOut
	if err := c.call(ctx, methodEvent, &cid, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RuntimeState mirrors boot.ContainerRuntimeState.
type RuntimeState int

// Container states in the sandbox.
const (
	StateInvalid RuntimeState = iota
	StateCreating
	StateRunning
	StateStopped
)

// State says whether container cid has started in the sandbox, and whether
// it has stopped since.
func (c *Client) State(ctx context.Context, cid string) (RuntimeState, error) {
	var st RuntimeState
	err := c.call(ctx, methodState, &cid, &st)
	return st, err
}

// Gone reports whether err says the sandbox is not there to answer.
func Gone(err error) bool { return errors.Is(err, ErrGone) }

// portForwardArgs mirrors boot.PortForwardOpts.
type portForwardArgs struct {
	urpc.FilePayload
	ContainerID string `json:"ContainerID"`
	Port        uint16 `json:"Port"`
}

// PortForward has the sandbox connect to port on its own localhost (its
// network stack, not the node's) and copy that connection to and from
// conn, a socket the sandbox is given; the caller keeps its copy.
func (c *Client) PortForward(ctx context.Context, cid string, port uint16, conn *os.File) error {
	return c.call(ctx, methodPortFwd, &portForwardArgs{FilePayload: urpc.FilePayload{Files: []*os.File{conn}}, ContainerID: cid, Port: port}, nil)
}
