// Package keeper is the node-wide process keeper of containerd-kuasar.
//
// containerd-kuasar runs no shim per pod, so something must stay the parent
// of workload processes across a restart of the daemon: the keeper. It is one
// small process per node (not per pod) that
//   - spawns processes on the daemon's behalf (runc create/exec, Wasm
//     runners, PID-namespace holders) and, being a child subreaper, adopts
//     the container processes those leave behind;
//   - reaps them and keeps each exit status until the daemon acknowledges
//     it, so exits that happen while the daemon is down are not lost;
//   - holds file descriptors the daemon asks it to keep (terminal masters,
//     stdin keep-alive ends), so they survive the daemon and can be taken
//     back after a restart.
//
// The daemon talks to it over a SOCK_SEQPACKET Unix socket: one JSON message
// per packet, with file descriptors attached as SCM_RIGHTS.
package keeper

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ProtocolVersion is bumped on any incompatible change of the messages.
const ProtocolVersion = 1

// maxMessage bounds one packet; spawn requests carry argv and env only.
const maxMessage = 64 << 10

// maxFDs bounds the descriptors attached to one message.
const maxFDs = 16

// Operations.
const (
	opHello     = "hello"
	opSpawn     = "spawn"
	opSubscribe = "subscribe"
	opAck       = "ack"
	opPutFD     = "putfd"
	opGetFD     = "getfd"
	opDropFD    = "dropfd"
	opSync      = "sync"
	opExit      = "exit" // event, keeper -> daemon
)

// NoFD marks a standard stream the child gets /dev/null for.
const NoFD = -1

// SpawnRequest asks the keeper to start a process as its child.
type SpawnRequest struct {
	Path string   `json:"path"`
	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	// Stdio maps the child's fds 0, 1, 2 to an index into the descriptors
	// attached to the request, or NoFD for /dev/null.
	Stdio [3]int `json:"stdio"`
	// Extra lists attached descriptors passed as fds 3, 4, ... in order.
	Extra []int `json:"extra,omitempty"`
	// Wait makes the reply wait for the child's exit and carry its status.
	// Without it the reply carries the pid and the exit arrives as an event.
	Wait bool `json:"wait,omitempty"`
	// Setsid puts the child in a new session.
	Setsid bool `json:"setsid,omitempty"`
	// Cloneflags are extra clone(2) flags, e.g. CLONE_NEWPID.
	Cloneflags uintptr `json:"cloneflags,omitempty"`
}

// Exit is the end of a process the keeper reaped.
type Exit struct {
	Pid int `json:"pid"`
	// Status follows containerd's convention: the exit code, or 128+signal
	// when the process was killed by a signal.
	Status   int       `json:"status"`
	Signaled bool      `json:"signaled,omitempty"`
	At       time.Time `json:"at"`
}

type message struct {
	ID      uint64        `json:"id"`
	Op      string        `json:"op,omitempty"`
	Version int           `json:"version,omitempty"`
	Spawn   *SpawnRequest `json:"spawn,omitempty"`
	Key     string        `json:"key,omitempty"`
	Prefix  bool          `json:"prefix,omitempty"`
	Pids    []int         `json:"pids,omitempty"`
	Signal  int           `json:"signal,omitempty"`

	// replies and events
	Error string `json:"error,omitempty"`
	Pid   int    `json:"pid,omitempty"`
	Exit  *Exit  `json:"exit,omitempty"`
	Exits []Exit `json:"exits,omitempty"`
}

// errNoFD is returned by getfd for an unknown key.
var errNoFD = errors.New("no descriptor held under that key")

// conn wraps a SOCK_SEQPACKET Unix connection carrying messages with fds.
// recv must be called from one goroutine at a time (it reuses buffers).
type conn struct {
	c   *net.UnixConn
	buf *recvBuf
}

type recvBuf struct {
	data [maxMessage]byte
	oob  [128]byte // room for maxFDs rights (CmsgSpace(16*4) = 80)
}

func newConn(c *net.UnixConn) conn { return conn{c: c, buf: new(recvBuf)} }

func (c conn) send(m *message, files ...*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("keeper message of %d bytes exceeds %d", len(b), maxMessage)
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.c.WriteMsgUnix(b, oob, nil)
	return err
}

// recv reads one message and the descriptors attached to it, which the
// caller owns.
func (c conn) recv() (*message, []*os.File, error) {
	buf, oob := c.buf.data[:], c.buf.oob[:unix.CmsgSpace(maxFDs*4)]
	n, oobn, flags, _, err := c.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, err
	}
	files, ferr := parseRights(oob[:oobn])
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll(files)
		return nil, nil, fmt.Errorf("keeper message truncated")
	}
	if ferr != nil {
		return nil, nil, ferr
	}
	if n == 0 {
		closeAll(files)
		return nil, nil, net.ErrClosed
	}
	var m message
	if err := json.Unmarshal(buf[:n], &m); err != nil {
		closeAll(files)
		return nil, nil, fmt.Errorf("decoding keeper message: %w", err)
	}
	return &m, files, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	scms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing control message: %w", err)
	}
	var files []*os.File
	for _, scm := range scms {
		fds, err := unix.ParseUnixRights(&scm)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("keeper-fd-%d", fd)))
		}
	}
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// exitFromWaitStatus converts a wait status to containerd's convention.
func exitFromWaitStatus(pid int, ws unix.WaitStatus, at time.Time) Exit {
	e := Exit{Pid: pid, At: at}
	switch {
	case ws.Exited():
		e.Status = ws.ExitStatus()
	case ws.Signaled():
		e.Status = 128 + int(ws.Signal())
		e.Signaled = true
	default:
		e.Status = 255
	}
	return e
}
