package runc

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

	"github.com/kuasar-io/containerd-kuasar/plugins/monitor"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// stdio is the daemon's side of a process's standard streams.
//
// Without a terminal the process writes straight into the FIFOs containerd
// gave us: it holds them open read-write, so its writes never hit a closed
// pipe while the daemon restarts. Its stdin FIFO is kept open for writing by
// the keeper until CloseIO, so the process sees EOF only when asked to.
//
// With a terminal the daemon copies between the FIFOs and the terminal
// master, whose descriptor the keeper also holds, so that a restarted daemon
// can take it back and resume copying.
type stdio struct {
	key string // keeper key prefix of the process
	io  task.IO

	mu      sync.Mutex
	console console.Console
	stdin   io.Closer
	outDone chan struct{}
}

func newStdio(key string, io task.IO) *stdio {
	return &stdio{key: key, io: io}
}

// open prepares the streams for runc create/exec. It returns the files to
// give runc as its stdio (nil: /dev/null) and, with a terminal, the console
// socket runc sends the master to. The caller closes the files after runc.
func (s *stdio) open(ctx context.Context, mon *monitor.Monitor) (files [3]*os.File, sock *gorunc.Socket, retErr error) {
	defer func() {
		if retErr != nil {
			closeFiles(files[:])
		}
	}()
	if s.io.Terminal {
		sock, err := gorunc.NewTempConsoleSocket()
		if err != nil {
			return files, nil, fmt.Errorf("creating console socket: %w", err)
		}
		return files, sock, nil
	}
	if s.io.Stdin != "" {
		r, w, err := openStdin(s.io.Stdin)
		if err != nil {
			return files, nil, err
		}
		files[0] = r
		// The keeper keeps a writer so the process does not see EOF before
		// CloseIO, even across a daemon restart.
		err = mon.PutFD(ctx, s.key+"stdin", w)
		w.Close()
		if err != nil {
			return files, nil, fmt.Errorf("handing stdin to the keeper: %w", err)
		}
	}
	var err error
	if files[1], err = openOutput(s.io.Stdout); err != nil {
		return files, nil, err
	}
	if s.io.Stderr == s.io.Stdout && files[1] != nil {
		files[2] = files[1]
	} else if files[2], err = openOutput(s.io.Stderr); err != nil {
		return files, nil, err
	}
	return files, nil, nil
}

// receiveConsole waits for runc to send the terminal master.
func receiveConsole(sock *gorunc.Socket) <-chan consoleResult {
	ch := make(chan consoleResult, 1)
	go func() {
		c, err := sock.ReceiveMaster()
		ch <- consoleResult{c, err}
	}()
	return ch
}

type consoleResult struct {
	c   console.Console
	err error
}

// attachConsole takes the master received from runc, lets the keeper hold
// it and starts copying.
func (s *stdio) attachConsole(ctx context.Context, mon *monitor.Monitor, ch <-chan consoleResult) error {
	var r consoleResult
	select {
	case r = <-ch:
	case <-time.After(10 * time.Second):
		return errors.New("runc did not send the terminal master")
	}
	if r.err != nil {
		return fmt.Errorf("receiving terminal master: %w", r.err)
	}
	// The keeper gets its own duplicate. (Wrapping the console's fd in a
	// second os.File would let that File's finalizer close it under us.)
	dup, err := unix.FcntlInt(r.c.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		r.c.Close()
		return fmt.Errorf("duplicating the terminal: %w", err)
	}
	f := os.NewFile(uintptr(dup), "pty-master")
	err = mon.PutFD(ctx, s.key+"master", f)
	f.Close()
	if err != nil {
		r.c.Close()
		return fmt.Errorf("handing the terminal to the keeper: %w", err)
	}
	return s.startCopy(r.c)
}

// reattach resumes a process's streams after a daemon restart.
func (s *stdio) reattach(ctx context.Context, mon *monitor.Monitor) error {
	if !s.io.Terminal {
		return nil
	}
	f, err := mon.GetFD(ctx, s.key+"master")
	if err != nil {
		return fmt.Errorf("taking the terminal back from the keeper: %w", err)
	}
	c, err := console.ConsoleFromFile(f)
	if err != nil {
		f.Close()
		return err
	}
	return s.startCopy(c)
}

func (s *stdio) startCopy(c console.Console) error {
	out, err := openOutput(s.io.Stdout)
	if err != nil {
		c.Close()
		return err
	}
	s.mu.Lock()
	s.console = c
	s.outDone = make(chan struct{})
	done := s.outDone
	s.mu.Unlock()
	go func() {
		defer close(done)
		if out == nil {
			_, _ = io.Copy(io.Discard, c)
			return
		}
		defer out.Close()
		// Ends with EIO once every process holding the terminal is gone.
		n, err := io.Copy(out, c)
		log.L.WithError(err).WithField("bytes", n).WithField("key", s.key).Debug("terminal output copy ended")
	}()
	if s.io.Stdin != "" {
		in, err := fifo.OpenFifo(context.Background(), s.io.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("opening stdin: %w", err)
		}
		s.mu.Lock()
		s.stdin = in
		s.mu.Unlock()
		go func() {
			n, err := io.Copy(c, in)
			log.L.WithError(err).WithField("bytes", n).WithField("key", s.key).Debug("terminal stdin copy ended")
		}()
	}
	return nil
}

// waitOutput waits (bounded) for terminal output to be copied out after
// the process ended.
func (s *stdio) waitOutput() {
	s.mu.Lock()
	done := s.outDone
	s.mu.Unlock()
	if done == nil {
		return
	}
	select {
	case <-done:
	case <-time.After(2 * time.Second):
	}
}

func (s *stdio) resize(w, h uint32) error {
	s.mu.Lock()
	c := s.console
	s.mu.Unlock()
	if c == nil {
		return fmt.Errorf("process has no terminal attached: %w", errdefs.ErrFailedPrecondition)
	}
	return c.Resize(console.WinSize{Width: uint16(w), Height: uint16(h)})
}

func (s *stdio) closeStdin(ctx context.Context, mon *monitor.Monitor) error {
	s.mu.Lock()
	in := s.stdin
	s.stdin = nil
	s.mu.Unlock()
	if in != nil {
		in.Close()
	}
	return mon.DropFD(ctx, s.key+"stdin", false)
}

// close releases everything, the keeper's copies included.
func (s *stdio) close(ctx context.Context, mon *monitor.Monitor) {
	s.waitOutput()
	s.mu.Lock()
	c, in := s.console, s.stdin
	s.console, s.stdin = nil, nil
	s.mu.Unlock()
	if in != nil {
		in.Close()
	}
	if c != nil {
		c.Close()
	}
	if err := mon.DropFD(ctx, s.key, true); err != nil {
		log.G(ctx).WithError(err).Debug("dropping held descriptors")
	}
}

// openStdin opens a stdin FIFO for the process (blocking reads) and a
// writer that keeps it from seeing EOF.
func openStdin(path string) (r, w *os.File, err error) {
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
	case strings.Contains(path, "://"):
		return nil, fmt.Errorf("log URI %q is not supported by kuasar-runc: %w", path, errdefs.ErrNotImplemented)
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

func closeFiles(files []*os.File) {
	seen := map[*os.File]bool{}
	for _, f := range files {
		if f != nil && !seen[f] {
			seen[f] = true
			f.Close()
		}
	}
}
