package keeper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	gorunc "github.com/containerd/go-runc"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

// consoleTimeout bounds the wait for the terminal master of a command that
// exited successfully.
const consoleTimeout = 10 * time.Second

// heldIO is what the keeper holds of one process's standard streams.
//
// Without a terminal the process writes straight into containerd's FIFOs
// (opened read-write, so its writes never hit a closed pipe while the daemon
// restarts), and the keeper keeps a writer of its stdin FIFO so that the
// process sees EOF only at CloseStdin. With a terminal the keeper takes the
// master runc sends to its console socket and copies between it and the
// FIFOs.
type heldIO struct {
	key   string
	stdio *api.Stdio
	owner ProcessRef

	sock      *gorunc.Socket
	consoleCh chan consoleResult

	mu        sync.Mutex
	stdinKeep *os.File // keeps stdin from seeing EOF until CloseStdin
	console   console.Console
	stdinSrc  io.Closer
	inDone    chan struct{} // the terminal's stdin copy ended
	outDone   chan struct{}
	released  bool
}

type consoleResult struct {
	c   console.Console
	err error
}

// childStdio are the descriptors a spawned process gets as fds 0, 1, 2.
type childStdio struct {
	files [3]*os.File
	null  *os.File
}

func (c *childStdio) fds() []uintptr {
	out := make([]uintptr, 3)
	for i, f := range c.files {
		if f == nil {
			f = c.null
		}
		out[i] = f.Fd()
	}
	return out
}

// close releases the keeper's copies of the child's descriptors; it may be
// called more than once.
func (c *childStdio) close() {
	seen := map[*os.File]bool{}
	for i, f := range c.files {
		if f != nil && !seen[f] {
			seen[f] = true
			f.Close()
		}
		c.files[i] = nil
	}
	if c.null != nil {
		c.null.Close()
		c.null = nil
	}
}

// openStdio opens the streams of a process to spawn. With a key, what must
// outlive the spawn is kept in the returned heldIO.
func openStdio(key string, st *api.Stdio) (_ *heldIO, _ *childStdio, retErr error) {
	h := &heldIO{key: key, stdio: st}
	c := &childStdio{}
	defer func() {
		if retErr != nil {
			c.close()
			h.release()
		}
	}()
	var err error
	if c.null, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
		return nil, nil, err
	}
	if st.GetTerminal() {
		sock, err := gorunc.NewTempConsoleSocket()
		if err != nil {
			return nil, nil, fmt.Errorf("creating console socket: %w", err)
		}
		h.sock = sock
		h.consoleCh = make(chan consoleResult, 1)
		go func() {
			c, err := sock.ReceiveMaster()
			h.consoleCh <- consoleResult{c, err}
		}()
		return h, c, nil
	}
	if st.GetStdin() != "" {
		r, w, err := openStdin(st.GetStdin())
		if err != nil {
			return nil, nil, err
		}
		c.files[0] = r
		if key != "" {
			h.stdinKeep = w
		} else {
			w.Close()
		}
	}
	if c.files[1], err = openOutput(st.GetStdout()); err != nil {
		return nil, nil, err
	}
	if st.GetStderr() == st.GetStdout() && c.files[1] != nil {
		c.files[2] = c.files[1]
	} else if c.files[2], err = openOutput(st.GetStderr()); err != nil {
		return nil, nil, err
	}
	return h, c, nil
}

// attach takes the terminal master of a command that created its process,
// and starts copying.
func (h *heldIO) attach(ctx context.Context) error {
	if h.consoleCh == nil {
		return nil
	}
	var r consoleResult
	select {
	case r = <-h.consoleCh:
	case <-time.After(consoleTimeout):
		return errors.New("no terminal master received on the console socket")
	case <-ctx.Done():
		return ctx.Err()
	}
	h.sock.Close()
	h.sock = nil
	if r.err != nil {
		return fmt.Errorf("receiving terminal master: %w", r.err)
	}
	out, err := openOutput(h.stdio.GetStdout())
	if err != nil {
		r.c.Close()
		return err
	}
	done := make(chan struct{})
	h.mu.Lock()
	h.console, h.outDone = r.c, done
	h.mu.Unlock()
	go func() {
		defer close(done)
		if out == nil {
			_, _ = io.Copy(io.Discard, r.c)
			return
		}
		defer out.Close()
		// Ends with EIO once every process holding the terminal is gone.
		n, err := io.Copy(out, r.c)
		log.L.WithError(err).WithField("bytes", n).WithField("key", h.key).Debug("terminal output copy ended")
	}()
	if p := h.stdio.GetStdin(); p != "" {
		in, err := fifo.OpenFifo(context.Background(), p, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("opening stdin: %w", err)
		}
		// A writer of our own keeps the copy from seeing EOF when the
		// daemon (CRI's writer) goes, until CloseStdin. (Read-write: a
		// FIFO opens so without waiting for the other side; nothing reads
		// through it.)
		keep, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			in.Close()
			return fmt.Errorf("opening stdin for keep-alive: %w", err)
		}
		h.mu.Lock()
		h.stdinSrc, h.stdinKeep = in, keep
		h.mu.Unlock()
		inDone := make(chan struct{})
		h.mu.Lock()
		h.inDone = inDone
		h.mu.Unlock()
		go func() {
			defer close(inDone)
			n, err := io.Copy(r.c, in)
			log.L.WithError(err).WithField("bytes", n).WithField("key", h.key).Debug("terminal stdin copy ended")
		}()
	}
	return nil
}

// waitOutput waits, at most d, for terminal output to be copied out.
func (h *heldIO) waitOutput(d time.Duration) {
	h.mu.Lock()
	done := h.outDone
	h.mu.Unlock()
	if done == nil {
		return
	}
	select {
	case <-done:
	case <-time.After(d):
	}
}

func (h *heldIO) resize(w, ht uint32) error {
	h.mu.Lock()
	c := h.console
	h.mu.Unlock()
	if c == nil {
		return fmt.Errorf("streams %q have no terminal: %w", h.key, errdefs.ErrFailedPrecondition)
	}
	return c.Resize(console.WinSize{Width: uint16(w), Height: uint16(ht)})
}

// stdinDrain bounds the wait, at CloseStdin, for what a terminal's stdin
// FIFO still holds to be copied to the terminal.
const stdinDrain = 2 * time.Second

func (h *heldIO) closeStdin() { h.endStdin(true) }

// endStdin closes the held stdin, letting what a terminal's FIFO still
// holds through first with drain.
func (h *heldIO) endStdin(drain bool) {
	h.mu.Lock()
	keep, src, inDone := h.stdinKeep, h.stdinSrc, h.inDone
	h.stdinKeep, h.stdinSrc = nil, nil
	h.mu.Unlock()
	if keep != nil {
		keep.Close()
	}
	if src != nil {
		// What the FIFO holds goes to the terminal first (the client's
		// writer is closed by now, so the copy ends with it).
		if drain && inDone != nil {
			select {
			case <-inDone:
			case <-time.After(stdinDrain):
			}
		}
		src.Close()
	}
}

// release closes everything; it may be called more than once.
func (h *heldIO) release() {
	if h == nil {
		return
	}
	h.endStdin(false)
	h.mu.Lock()
	c, sock := h.console, h.sock
	h.console, h.sock, h.released = nil, nil, true
	h.mu.Unlock()
	if c != nil {
		c.Close()
	}
	if sock != nil {
		sock.Close()
	}
}

// openStdin opens a stdin FIFO for the process (blocking reads) and a
// writer that keeps it from seeing EOF.
func openStdin(path string) (r, w *os.File, err error) {
	if err := checkStreamPath(path); err != nil {
		return nil, nil, err
	}
	r, err = os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening stdin: %w", err)
	}
	w, err = os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		r.Close()
		return nil, nil, fmt.Errorf("opening stdin for keep-alive: %w", err)
	}
	if err := unix.SetNonblock(int(r.Fd()), false); err != nil {
		r.Close()
		w.Close()
		return nil, nil, err
	}
	return r, w, nil
}

// openOutput opens where a process's output goes: a FIFO (opened
// read-write, so it never blocks or breaks for want of a reader), a
// file:// URI, or nothing.
func openOutput(path string) (*os.File, error) {
	switch {
	case path == "":
		return nil, nil
	case strings.HasPrefix(path, "file://"):
		return os.OpenFile(strings.TrimPrefix(path, "file://"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	}
	if err := checkStreamPath(path); err != nil {
		return nil, err
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("opening output %s: %w", path, err)
	}
	if st.Mode()&os.ModeNamedPipe != 0 {
		return os.OpenFile(path, os.O_RDWR, 0)
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
}

func checkStreamPath(path string) error {
	if strings.Contains(path, "://") {
		return fmt.Errorf("stream URI %q is not supported (FIFO paths and file:// only): %w", path, errdefs.ErrNotImplemented)
	}
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("stream path %q is not absolute: %w", path, errdefs.ErrInvalidArgument)
	}
	return nil
}

// OpenStdin opens a stdin FIFO as the keeper does for the processes it
// spawns: a reader to give the process (blocking reads) and a writer that
// keeps it from seeing EOF for as long as the caller holds it. For streams
// the daemon hands to a process itself (kuasar-gvisor's execs, which it
// starts through the sandbox's control socket).
func OpenStdin(path string) (r, w *os.File, err error) { return openStdin(path) }

// OpenOutput opens where a process's output goes as the keeper does: a
// FIFO read-write (it never blocks or breaks for want of a reader), a
// file:// URI, or nothing (nil).
func OpenOutput(path string) (*os.File, error) { return openOutput(path) }
