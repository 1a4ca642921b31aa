package agent

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// readStream reads a buffer to its end, acknowledging as the host does.
func readStream(t *testing.T, p *procIO, s agentapi.Stream) string {
	t.Helper()
	b, err := p.buffer(s)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	var off uint64
	for {
		c, err := b.Read(context.Background(), off, 0, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c.Data...)
		off += uint64(len(c.Data))
		if c.EOF {
			return string(out)
		}
	}
}

func TestProcIOPipes(t *testing.T) {
	ctx := context.Background()
	p, err := newProcIO(task.IO{Stdin: "i", Stdout: "o", Stderr: "e"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p.release()
	in, out, errw := p.child.in, p.child.out, p.child.err
	p.child = stdio{} // the test is the process: it keeps its ends

	if err := p.write(ctx, []byte("input")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(in, buf); err != nil || string(buf) != "input" {
		t.Fatalf("the process read %q, %v", buf, err)
	}
	if err := p.closeStdin(); err != nil {
		t.Fatal(err)
	}
	if n, err := in.Read(buf); err != io.EOF {
		t.Errorf("stdin after closeStdin: %d, %v; want EOF", n, err)
	}
	if err := p.write(ctx, []byte("late")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write after closeStdin: %v", err)
	}
	if err := p.closeStdin(); err != nil {
		t.Errorf("closeStdin twice: %v", err)
	}

	out.Write([]byte("to stdout"))
	errw.Write([]byte("to stderr"))
	out.Close()
	errw.Close()
	in.Close()
	if got := readStream(t, p, agentapi.Stream_STDOUT); got != "to stdout" {
		t.Errorf("stdout %q", got)
	}
	if got := readStream(t, p, agentapi.Stream_STDERR); got != "to stderr" {
		t.Errorf("stderr %q", got)
	}
	if err := p.resize(80, 24); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("resize without a terminal: %v", err)
	}
}

func TestProcIONoStreams(t *testing.T) {
	p, err := newProcIO(task.IO{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p.release()
	for _, f := range []*os.File{p.child.in, p.child.out, p.child.err} {
		if f == nil || f.Name() != os.DevNull {
			t.Errorf("a stream the process does not have is %v, want %s", f, os.DevNull)
		}
	}
	p.closeChild()
	for _, s := range []agentapi.Stream{agentapi.Stream_STDOUT, agentapi.Stream_STDERR} {
		if _, err := p.buffer(s); !errdefs.IsNotFound(err) {
			t.Errorf("buffer(%s): %v", s, err)
		}
	}
	if _, err := p.buffer(agentapi.Stream(7)); !errdefs.IsInvalidArgument(err) {
		t.Errorf("buffer of an unknown stream: %v", err)
	}
	if err := p.write(context.Background(), []byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write without stdin: %v", err)
	}
	if err := p.closeStdin(); err != nil {
		t.Errorf("closeStdin without stdin: %v", err)
	}
}

// TestProcIOWriteCanceled: a write the process does not read ends with the
// call's context.
func TestProcIOWriteCanceled(t *testing.T) {
	p, err := newProcIO(task.IO{Stdin: "i"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p.release()
	defer p.closeChild() // the process never reads
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.write(ctx, make([]byte, 4<<20)); err == nil {
		t.Fatal("a write larger than the pipe, never read, succeeded")
	}
	// A later write with a live context is not hit by the old deadline.
	done := make(chan error, 1)
	go func() { done <- p.write(context.Background(), []byte("x")) }()
	drain := make([]byte, 8<<20)
	for {
		n, err := p.child.in.Read(drain)
		if err != nil {
			t.Fatal(err)
		}
		if drain[n-1] == 'x' {
			break
		}
	}
	if err := <-done; err != nil {
		t.Errorf("write after a canceled one: %v", err)
	}
}

func TestProcIOTerminal(t *testing.T) {
	ctx := context.Background()
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatalf("no pseudo-terminal here: %v", err)
	}
	defer slave.Close()
	p, err := newProcIO(task.IO{Stdin: "i", Stdout: "o", Terminal: true}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p.release()
	p.closeChild()
	if err := p.write(ctx, []byte("x")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write before the terminal came: %v", err)
	}
	p.setConsole(master) // opened by pty.Open through Go's poller, as recvFd makes it

	if err := p.resize(132, 43); err != nil {
		t.Fatal(err)
	}
	ws, err := unix.IoctlGetWinsize(int(slave.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col != 132 || ws.Row != 43 {
		t.Errorf("terminal size %+v, %v", ws, err)
	}
	if err := p.write(ctx, []byte("line\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := slave.Read(buf)
	if err != nil || string(buf[:n]) != "line\n" {
		t.Errorf("the process read %q, %v", buf[:n], err)
	}
	// closeStdin: end of file for a reader in canonical mode.
	if err := p.closeStdin(); err != nil {
		t.Fatal(err)
	}
	if n, err := slave.Read(buf); n != 0 || err != nil && err != io.EOF {
		t.Errorf("read after closeStdin: %d %q, %v; want end of file", n, buf[:n], err)
	}
	if _, err := p.buffer(agentapi.Stream_STDERR); !errdefs.IsInvalidArgument(err) {
		t.Errorf("stderr of a terminal: %v", err)
	}
	slave.Write([]byte("out"))
	slave.Close() // the last writer: the master reads EIO, the stream ends
	if got := readStream(t, p, agentapi.Stream_STDOUT); got != "line\r\nout" {
		t.Errorf("terminal output %q (the echo of the input, then the process's)", got)
	}
}

func TestConsoleSocket(t *testing.T) {
	dir := t.TempDir()
	cs, err := newConsoleSocket(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// What runc does: connect, send the master with its name, hang up.
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: cs.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := conn.WriteMsgUnix([]byte("/dev/pts/7"), unix.UnixRights(int(w.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	w.Close()
	got, err := cs.receive(time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if got.Name() != "/dev/pts/7" {
		t.Errorf("name %q", got.Name())
	}
	if _, err := got.Write([]byte("through")); err != nil {
		t.Fatal(err)
	}
	got.Close()
	if b, err := io.ReadAll(r); err != nil || string(b) != "through" {
		t.Errorf("read %q, %v", b, err)
	}
	cs.Close()
	if _, err := os.Stat(filepath.Join(dir, filepath.Base(cs.path))); !os.IsNotExist(err) {
		t.Errorf("console socket left: %v", err)
	}
}

// TestProcIOCloseDuringWrite: CloseStdin does not wait for a write the
// process does not read; the write fails.
func TestProcIOCloseDuringWrite(t *testing.T) {
	p, err := newProcIO(task.IO{Stdin: "i"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p.release()
	defer p.closeChild()
	wrote := make(chan error, 1)
	go func() { wrote <- p.write(context.Background(), make([]byte, 4<<20)) }()
	if err := p.closeStdin(); err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write while stdin closed: %v", err)
	}
}
