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
	srv, err := ttrpc.NewServer()
	if err != nil {
		l.Close()
		return nil, err
	}
	taskAPI.RegisterTTRPCTaskService(srv, svc)
	e := &Endpoint{path: path, srv: srv, l: l}
	go func() {
		if err := srv.Serve(context.WithoutCancel(ctx), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
			log.G(ctx).WithError(err).WithField("socket", path).Error("task endpoint stopped")
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
