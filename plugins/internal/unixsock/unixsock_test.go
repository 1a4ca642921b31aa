package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

func TestListen(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s", "x.sock")
	l, err := Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix", sock); err == nil {
		t.Fatal("a second server took the same socket")
	}
	go func() {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
	}()
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckPeer(c); err != nil {
		t.Fatalf("own user refused: %v", err)
	}
	// From the client's side: who serves the socket.
	cc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if err := CheckPeerPid(cc, os.Getpid()); err != nil {
		t.Errorf("the server's own pid refused: %v", err)
	}
	if err := CheckPeerPid(cc, os.Getpid()+1); !errdefs.IsPermissionDenied(err) {
		t.Errorf("another pid: %v, want PermissionDenied", err)
	}
	c.Close()
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st, err)
	}
	l.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after close: %v", err)
	}
	// Released: another server may take it now.
	l2, err := Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l2.Close()
}

func TestNative(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		is   func(error) bool
	}{
		{"nil", nil, func(err error) bool { return err == nil }},
		{"a server's not found", errgrpc.ToGRPC(fmt.Errorf("x: %w", errdefs.ErrNotFound)), errdefs.IsNotFound},
		{"a server's unavailable", errgrpc.ToGRPC(fmt.Errorf("x: %w", errdefs.ErrUnavailable)), errdefs.IsUnavailable},
		{"a broken connection", ttrpc.ErrClosed, func(err error) bool { return errors.Is(err, ttrpc.ErrClosed) && !errdefs.IsUnavailable(err) }},
		{"the call's deadline", context.DeadlineExceeded, func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }},
		{"the call's cancellation", context.Canceled, func(err error) bool { return errors.Is(err, context.Canceled) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Native(tc.err); !tc.is(got) {
				t.Fatalf("Native(%v) = %v", tc.err, got)
			}
		})
	}
}

// TestErrorClasses: a server's error reaches the client of Dial with its
// errdefs class (through Native), over a real connection; a panic is the
// call's error, of class internal.
func TestErrorClasses(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	l, err := Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer("test")
	if err != nil {
		t.Fatal(err)
	}
	srv.RegisterService("test.v1.T", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"NotFound": func(context.Context, func(any) error) (any, error) {
			return nil, fmt.Errorf("no such thing: %w", errdefs.ErrNotFound)
		},
		"Panic": func(context.Context, func(any) error) (any, error) { panic("boom") },
		"OK":    func(context.Context, func(any) error) (any, error) { return &emptypb.Empty{}, nil },
	}})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, srv, l.UnixListener) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
		l.Close()
	}()
	c, err := Dial(ctx, sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	call := func(method string) error {
		return Native(c.Call(ctx, "test.v1.T", method, &emptypb.Empty{}, &emptypb.Empty{}))
	}
	if err := call("OK"); err != nil {
		t.Fatalf("OK: %v", err)
	}
	if err := call("NotFound"); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "no such thing") {
		t.Errorf("NotFound: %v (%T), want an errdefs not found", err, err)
	}
	if err := call("Panic"); !errdefs.IsInternal(err) || !strings.Contains(err.Error(), "boom") {
		t.Errorf("Panic: %v, want an errdefs internal error", err)
	}
}
