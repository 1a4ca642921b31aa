package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/stream"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// ReadStdio serves a process's output from an offset (see agent.proto).
func (a *agent) ReadStdio(ctx context.Context, r *agentapi.ReadStdioRequest) (*agentapi.ReadStdioResponse, error) {
	io, err := a.ctrs.process(r.Process)
	if err != nil {
		return nil, err
	}
	b, err := io.buffer(r.Stream)
	if err != nil {
		return nil, err
	}
	c, err := b.Read(ctx, r.Offset, int(r.MaxBytes), time.Duration(r.WaitMs)*time.Millisecond)
	if errors.Is(err, stream.ErrClosed) {
		return nil, fmt.Errorf("the process was deleted: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return &agentapi.ReadStdioResponse{Offset: c.Offset, Data: c.Data, Eof: c.EOF}, nil
}

// WriteStdin writes to a process's stdin or terminal; it returns once all
// of the data is written (the process may have to read first).
func (a *agent) WriteStdin(ctx context.Context, r *agentapi.WriteStdinRequest) (*emptypb.Empty, error) {
	io, err := a.ctrs.process(r.Process)
	if err != nil {
		return nil, err
	}
	if err := io.write(ctx, r.Data); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// CloseStdin ends a process's input.
func (a *agent) CloseStdin(ctx context.Context, r *agentapi.ProcessStdio) (*emptypb.Empty, error) {
	io, err := a.ctrs.process(r)
	if err != nil {
		return nil, err
	}
	if err := io.closeStdin(); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// procIO holds the standard streams of one process of the task service.
// The agent makes them (pipes, or a terminal whose master runc hands over
// its console socket) and serves them to the host: output through stream
// Buffers read with ReadStdio, input through WriteStdin/CloseStdin.
type procIO struct {
	terminal bool
	// wantStdin: the process has a stdin (with a terminal: the host may
	// write to it).
	wantStdin bool
	// child are the process's ends, handed to runc and closed once it ran.
	child stdio
	// out and err are nil for a stream the process does not have.
	out, err *stream.Buffer

	// writeMu serializes writes to stdin (one may block for long: mu is
	// not held meanwhile, so a resize or CloseStdin does not wait).
	writeMu sync.Mutex

	mu          sync.Mutex
	stdin       *os.File // the pipe's write end, or the terminal's master
	stdinClosed bool
	console     *os.File
	sources     []*os.File // what the buffers are filled from
}

// newProcIO makes the streams a process asked for: pipes for stdin,
// stdout and stderr where io names them (the names themselves mean
// nothing in the guest), /dev/null for the others; with a terminal only
// /dev/null, the terminal comes later (setConsole).
func newProcIO(io task.IO, limit int) (_ *procIO, retErr error) {
	p := &procIO{terminal: io.Terminal, wantStdin: io.Stdin != ""}
	defer func() {
		if retErr != nil {
			p.closeChild()
			p.release()
		}
	}()
	null := func() (*os.File, error) { return os.OpenFile(os.DevNull, os.O_RDWR, 0) }
	var err error
	if p.terminal {
		p.out = stream.New(limit)
		for _, f := range []**os.File{&p.child.in, &p.child.out, &p.child.err} {
			if *f, err = null(); err != nil {
				return nil, err
			}
		}
		return p, nil
	}
	if p.wantStdin {
		if p.child.in, p.stdin, err = os.Pipe(); err != nil {
			return nil, err
		}
	} else if p.child.in, err = null(); err != nil {
		return nil, err
	}
	for _, s := range []struct {
		want  bool
		child **os.File
		buf   **stream.Buffer
	}{{io.Stdout != "", &p.child.out, &p.out}, {io.Stderr != "", &p.child.err, &p.err}} {
		if !s.want {
			if *s.child, err = null(); err != nil {
				return nil, err
			}
			continue
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		*s.child = w
		*s.buf = stream.New(limit)
		p.fill(*s.buf, r)
	}
	return p, nil
}

// fill starts copying src into b.
func (p *procIO) fill(b *stream.Buffer, src *os.File) {
	p.mu.Lock()
	p.sources = append(p.sources, src)
	p.mu.Unlock()
	go func() {
		_ = b.Fill(src) // the end (EOF, EIO of a terminal) is the buffer's EOF
	}()
}

// setConsole takes the terminal's master, received from runc.
func (p *procIO) setConsole(master *os.File) {
	p.mu.Lock()
	p.console = master
	if p.wantStdin && !p.stdinClosed {
		p.stdin = master
	}
	p.mu.Unlock()
	p.fill(p.out, master)
}

// closeChild closes the process's ends in the agent, once runc has handed
// them to the process (or failed).
func (p *procIO) closeChild() {
	for _, f := range []*os.File{p.child.in, p.child.out, p.child.err} {
		if f != nil {
			f.Close()
		}
	}
	p.child = stdio{}
}

// release drops everything: buffered output, pipes, the terminal.
func (p *procIO) release() {
	p.mu.Lock()
	stdin, console, sources := p.stdin, p.console, p.sources
	p.stdin, p.stdinClosed, p.sources = nil, true, nil
	p.mu.Unlock()
	if stdin != nil && stdin != console {
		stdin.Close()
	}
	for _, b := range []*stream.Buffer{p.out, p.err} {
		if b != nil {
			b.Close()
		}
	}
	for _, f := range sources { // the terminal's master among them
		f.Close()
	}
}

// buffer returns the buffer of one output stream.
func (p *procIO) buffer(s agentapi.Stream) (*stream.Buffer, error) {
	switch {
	case s == agentapi.Stream_STDOUT && p.out != nil:
		return p.out, nil
	case s == agentapi.Stream_STDERR && p.terminal:
		return nil, fmt.Errorf("the process has a terminal: its only output stream is STDOUT: %w", errdefs.ErrInvalidArgument)
	case s == agentapi.Stream_STDERR && p.err != nil:
		return p.err, nil
	case s != agentapi.Stream_STDOUT && s != agentapi.Stream_STDERR:
		return nil, fmt.Errorf("unknown stream %d: %w", s, errdefs.ErrInvalidArgument)
	}
	return nil, fmt.Errorf("the process has no %s (it was created without one): %w", s, errdefs.ErrNotFound)
}

// input returns where stdin goes, or why it cannot be written.
func (p *procIO) input() (*os.File, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case !p.wantStdin:
		return nil, fmt.Errorf("the process has no stdin (it was created without one): %w", errdefs.ErrFailedPrecondition)
	case p.stdinClosed:
		return nil, fmt.Errorf("the process's stdin is closed: %w", errdefs.ErrFailedPrecondition)
	case p.stdin == nil:
		return nil, fmt.Errorf("the process's terminal is not there yet: %w", errdefs.ErrFailedPrecondition)
	}
	return p.stdin, nil
}

// write writes all of data to the process's stdin, blocking while the
// process does not read (until ctx is done: then a prefix of data may
// have been written).
func (p *procIO) write(ctx context.Context, data []byte) error {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	f, err := p.input()
	if err != nil || len(data) == 0 {
		return err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = f.SetWriteDeadline(time.Unix(1, 0)) // in the past: the write returns
		close(fired)
	})
	_, err = f.Write(data)
	if !stop() {
		<-fired
		_ = f.SetWriteDeadline(time.Time{})
		if err != nil {
			return fmt.Errorf("writing stdin: %w", errors.Join(ctx.Err(), err))
		}
	}
	switch {
	case errors.Is(err, os.ErrClosed):
		return fmt.Errorf("writing stdin: it was closed meanwhile: %w", errdefs.ErrFailedPrecondition)
	case errors.Is(err, unix.EPIPE), errors.Is(err, unix.EIO):
		return fmt.Errorf("writing stdin: the process closed it: %w: %w", err, errdefs.ErrFailedPrecondition)
	case err != nil:
		return fmt.Errorf("writing stdin: %w", err)
	}
	return nil
}

// closeStdin ends the process's input: the pipe is closed (the process
// reads EOF; a write blocked on it fails); a terminal gets its
// end-of-file character (a reader in canonical mode reads EOF, a shell
// exits) and stays open, for the output.
func (p *procIO) closeStdin() error {
	p.mu.Lock()
	if p.stdinClosed || !p.wantStdin {
		p.stdinClosed = true
		p.mu.Unlock()
		return nil
	}
	p.stdinClosed = true
	stdin, console := p.stdin, p.console
	if !p.terminal {
		p.stdin = nil
	}
	p.mu.Unlock()
	if !p.terminal {
		return stdin.Close()
	}
	if console == nil {
		return nil
	}
	eof := byte(4) // ^D
	_ = control(console, func(fd int) error {
		if t, err := unix.IoctlGetTermios(fd, unix.TCGETS); err == nil && t.Cc[unix.VEOF] != 0 {
			eof = t.Cc[unix.VEOF]
		}
		return nil
	})
	p.writeMu.Lock() // after a write in progress
	defer p.writeMu.Unlock()
	if _, err := console.Write([]byte{eof}); err != nil && !errors.Is(err, unix.EIO) && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("sending end of file to the terminal: %w", err)
	}
	return nil
}

// resize sets the terminal's size.
func (p *procIO) resize(width, height uint32) error {
	p.mu.Lock()
	console := p.console
	p.mu.Unlock()
	if !p.terminal {
		return fmt.Errorf("the process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	if console == nil {
		return fmt.Errorf("the process's terminal is not there yet: %w", errdefs.ErrFailedPrecondition)
	}
	if width > 0xffff || height > 0xffff {
		return fmt.Errorf("terminal size %dx%d: %w", width, height, errdefs.ErrInvalidArgument)
	}
	return control(console, func(fd int) error {
		return unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Col: uint16(width), Row: uint16(height)})
	})
}

// control runs fn on f's descriptor without taking it out of Go's poller
// (f.Fd() would make it blocking).
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// consoleSocket receives the master of the terminal runc makes for a
// process (runc --console-socket).
type consoleSocket struct {
	path string
	l    *net.UnixListener
}

// newConsoleSocket listens on a new socket in dir.
func newConsoleSocket(dir string) (*consoleSocket, error) {
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, hex.EncodeToString(rnd[:])+".sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("console socket: %w", err)
	}
	return &consoleSocket{path: path, l: l}, nil
}

// receive takes the master runc sent. runc has exited by now, so it waits
// only for what is already queued on the socket, bounded by timeout.
func (s *consoleSocket) receive(timeout time.Duration) (*os.File, error) {
	if err := s.l.SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	conn, err := s.l.AcceptUnix()
	if err != nil {
		return nil, fmt.Errorf("runc did not send the terminal: %w", err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	return recvFd(conn)
}

// recvFd reads one message carrying a file descriptor (SCM_RIGHTS) and
// returns it as a non-blocking file; other descriptors are closed.
func recvFd(conn *net.UnixConn) (*os.File, error) {
	buf := make([]byte, 4096) // the terminal's name
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("receiving the terminal: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, fmt.Errorf("receiving the terminal: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if got, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, got...)
		}
	}
	if len(fds) == 0 {
		return nil, errors.New("receiving the terminal: no file descriptor in the message")
	}
	for _, fd := range fds[1:] {
		unix.Close(fd)
	}
	fd := fds[0]
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	name := string(buf[:n])
	if name == "" {
		name = "console"
	}
	return os.NewFile(uintptr(fd), name), nil
}

// Close stops listening and removes the socket.
func (s *consoleSocket) Close() {
	s.l.Close() // a listener's Close unlinks its socket
}
