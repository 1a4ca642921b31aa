package vmm

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// silentAgent is a hostile guest's agent: it says hello, then never answers
// a write to a process's stdin (nor a read of its output).
type silentAgent struct {
	agentapi.AgentService
	writes chan struct{}
}

func (a *silentAgent) Hello(context.Context, *agentapi.HelloRequest) (*agentapi.HelloResponse, error) {
	return &agentapi.HelloResponse{Version: agentapi.ProtocolVersion}, nil
}

func (a *silentAgent) WriteStdin(ctx context.Context, _ *agentapi.WriteStdinRequest) (*emptypb.Empty, error) {
	select {
	case a.writes <- struct{}{}:
	default:
	}
	<-ctx.Done()
	return nil, ctx.Err()
}

func (a *silentAgent) ReadStdio(ctx context.Context, _ *agentapi.ReadStdioRequest) (*agentapi.ReadStdioResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (a *silentAgent) CloseStdin(context.Context, *agentapi.ProcessStdio) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

// socketVM is a VM whose agent is a ttrpc server on a Unix socket.
type socketVM struct {
	path   string
	exited chan struct{}
}

func (v *socketVM) Pid() int                            { return 0 }
func (v *socketVM) State() hypervisor.State             { return hypervisor.State{ID: "fake"} }
func (v *socketVM) Stop(context.Context) error          { return nil }
func (v *socketVM) Console(context.Context, int) string { return "" }
func (v *socketVM) Wait(ctx context.Context) error      { <-ctx.Done(); return ctx.Err() }
func (v *socketVM) Exited() <-chan struct{}             { return v.exited }
func (v *socketVM) Close() error                        { return nil }
func (v *socketVM) Cleanup() error                      { return nil }
func (v *socketVM) DialAgent(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", v.path)
}

func serveAgent(t *testing.T, svc agentapi.AgentService) *socketVM {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agentapi.RegisterAgentService(srv, svc)
	go func() { _ = srv.Serve(context.Background(), ln) }()
	t.Cleanup(func() { srv.Close() })
	return &socketVM{path: path, exited: make(chan struct{})}
}

// A guest that never answers WriteStdin must not hang CloseIO: closeStdin
// waits stdinDrain for the stdin pump, closes the FIFO, then waits for the
// pump again without a bound, while the pump sits in a WriteStdin call
// whose context nothing cancels (and CloseIO's own context is not used
// for it). CRI's CloseIO (stdin_once attach, `crictl exec -i` ending) never
// returns, and the pump's goroutine stays until the container is deleted.
func TestCloseStdinBoundedWhenGuestNeverAnswers(t *testing.T) {
	agent := &silentAgent{writes: make(chan struct{}, 1)}
	g := newGuestConn(serveAgent(t, agent))
	defer g.close()

	stdin := filepath.Join(t.TempDir(), "stdin")
	if err := unix.Mkfifo(stdin, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &task.Process{Container: &task.Container{ID: "c1"}, IO: task.IO{Stdin: stdin}}
	s, err := startStreams(g, p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.stop()
	// The client writes to stdin, then closes it.
	w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	w.Close()
	select {
	case <-agent.writes:
	case <-time.After(10 * time.Second):
		t.Fatal("the stdin pump never called WriteStdin")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.closeStdin(ctx, g) }()
	select {
	case <-done:
	case <-time.After(stdinDrain + 10*time.Second):
		t.Fatalf("CloseIO still blocked after %s (its context ended after 5s): a guest that never answers WriteStdin hangs it", stdinDrain+10*time.Second)
	}
}
