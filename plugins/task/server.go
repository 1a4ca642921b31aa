package task

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
)

// Version is the task API version the endpoints speak. containerd connects
// tasks straight to a sandbox endpoint of version 3, with no shim process.
const Version = 3

// Endpoint serves one sandbox's task service on a Unix socket.
type Endpoint struct {
	path string
	srv  *ttrpc.Server
	l    net.Listener
}

// maxSocketPath is the length limit of a Unix socket path.
const maxSocketPath = 107

// Listen starts serving svc on a Unix socket at path.
func Listen(ctx context.Context, path string, svc taskAPI.TTRPCTaskService) (*Endpoint, error) {
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("task socket path %q is longer than %d bytes", path, maxSocketPath)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening for tasks: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	// Only the daemon's own user (containerd itself) may call, as with
	// containerd's shims.
	srv, err := unixsock.NewServer("task endpoint")
	if err != nil {
		l.Close()
		return nil, err
	}
	taskAPI.RegisterTTRPCTaskService(srv, svc)
	e := &Endpoint{path: path, srv: srv, l: l}
	// Each request is served on a context of its own (ttrpc derives one
	// per request, with the caller's namespace and deadline), never on the
	// context of the call that started the sandbox.
	serveCtx := log.WithLogger(context.Background(), log.G(ctx).WithField("socket", path))
	go func() {
		if err := srv.Serve(serveCtx, l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
			log.G(serveCtx).WithError(err).Error("task endpoint stopped")
		}
	}()
	return e, nil
}

// Address is the endpoint in the form containerd expects from a sandbox
// controller.
func (e *Endpoint) Address() string { return "ttrpc+unix://" + e.path }

// Close stops serving and removes the socket.
func (e *Endpoint) Close() error {
	err := e.srv.Close()
	if rerr := os.Remove(e.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}
