package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

const (
	dialEnv = "UNIXSOCK_TEST_DIAL"
	// Exit codes of the re-executed dialer.
	callRefused  = 10
	callServed   = 11
	callErrOther = 12
)

func TestMain(m *testing.M) {
	if sock := os.Getenv(dialEnv); sock != "" {
		os.Exit(dialAndCall(sock))
	}
	os.Exit(m.Run())
}

// testService answers Ping, fails Fail with an errdefs class, and panics
// in Panic.
func registerTestService(srv *ttrpc.Server) {
	srv.RegisterService("kuasar.test.v1.Test", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Ping": func(ctx context.Context, unmarshal func(any) error) (any, error) {
			return &emptypb.Empty{}, nil
		},
		"Fail": func(ctx context.Context, unmarshal func(any) error) (any, error) {
			return nil, fmt.Errorf("no such thing: %w", errdefs.ErrNotFound)
		},
		"Panic": func(ctx context.Context, unmarshal func(any) error) (any, error) {
			var m map[string]int
			m["boom"]++
			return nil, nil
		},
	}})
}

func call(ctx context.Context, c *ttrpc.Client, method string) error {
	return Native(c.Call(ctx, "kuasar.test.v1.Test", method, &emptypb.Empty{}, &emptypb.Empty{}))
}

func dialAndCall(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock, nil)
	if err != nil {
		return callErrOther
	}
	defer c.Close()
	switch err := call(ctx, c, "Ping"); {
	case err == nil:
		return callServed
	case IsClosed(err) || errors.Is(err, ttrpc.ErrClosed):
		return callRefused
	default:
		fmt.Fprintln(os.Stderr, err)
		return callErrOther
	}
}

func serveTest(t *testing.T, sock string) {
	t.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer("test")
	if err != nil {
		t.Fatal(err)
	}
	registerTestService(srv)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Serve(ctx, srv, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func TestServerErrorsAndPanics(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "t.sock")
	serveTest(t, sock)
	ctx := context.Background()
	c, err := Dial(ctx, sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := call(ctx, c, "Ping"); err != nil {
		t.Fatal(err)
	}
	if err := call(ctx, c, "Fail"); !errdefs.IsNotFound(err) {
		t.Fatalf("error class lost on the wire: %v", err)
	}
	if err := call(ctx, c, "Panic"); !errdefs.IsInternal(err) {
		t.Fatalf("a panicking call: %v", err)
	}
	// The server is still there for the next call.
	if err := call(ctx, c, "Ping"); err != nil {
		t.Fatalf("after a panic: %v", err)
	}
}

// Only the server's own user may call: another user's connection is
// refused even where the socket's mode would let it connect.
func TestServerRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	// A directory the other user can reach, with a copy of the test
	// binary it can run.
	dir, err := os.MkdirTemp("", "unixsock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dialer := filepath.Join(dir, "dialer")
	if err := os.WriteFile(dialer, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "t.sock")
	serveTest(t, sock)
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	run := func(cred *syscall.Credential) int {
		cmd := exec.Command(dialer, "-test.run=^$")
		cmd.Env = []string{dialEnv + "=" + sock}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ee.ExitCode() == callErrOther {
				t.Logf("dialer: %s", out)
			}
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	}
	if code := run(nil); code != callServed {
		t.Fatalf("own user: exit %d, want served", code)
	}
	if code := run(&syscall.Credential{Uid: 65534, Gid: 65534}); code != callRefused {
		t.Fatalf("another user: exit %d, want refused", code)
	}
}
