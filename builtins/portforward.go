package builtins

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-streaming/pkg/streaming"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// CRI's port-forward connects to localhost in the pod's network namespace
// on the node. A VM pod's localhost is in its guest: for the pods of a
// kind that forwards ports itself (sandbox.PortForwarder), PortForward
// answers with a URL of a streaming server of our own, whose port-forward
// goes through the kind; every other pod's goes to CRI's as before. The
// server is the kubelet's streaming library, as CRI's is, listening on
// loopback (the kubelet, on the node, connects to the URL; a URL holds a
// single-use random token, as CRI's do).

// portForwardFix sends the port-forwards of forwarding kinds' pods to our
// streaming server.
type portForwardFix struct {
	runtime.RuntimeServiceServer
	controllers []*sandbox.Controller

	once   sync.Once
	server streaming.Server
	err    error
}

func (f *portForwardFix) forwarder(id string) (sandbox.PortForwarder, bool) {
	for _, c := range f.controllers {
		if pf, ok := c.PortForwarder(id); ok {
			return pf, true
		}
	}
	return nil, false
}

func (f *portForwardFix) PortForward(ctx context.Context, r *runtime.PortForwardRequest) (*runtime.PortForwardResponse, error) {
	if _, ok := f.forwarder(r.GetPodSandboxId()); !ok {
		return f.RuntimeServiceServer.PortForward(ctx, r)
	}
	s, err := f.start(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return s.GetPortForward(r)
}

// start starts the streaming server once.
func (f *portForwardFix) start(ctx context.Context) (streaming.Server, error) {
	f.once.Do(func() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.err = fmt.Errorf("starting the port-forward server: %w: %w", err, errdefs.ErrUnavailable)
			return
		}
		cfg := streaming.DefaultConfig
		cfg.Addr = ln.Addr().String()
		cfg.BaseURL = &url.URL{Scheme: "http", Host: cfg.Addr}
		s, err := streaming.NewServer(cfg, forwardRuntime{f})
		if err != nil {
			ln.Close()
			f.err = fmt.Errorf("starting the port-forward server: %w", err)
			return
		}
		f.server = s
		go func() {
			err := http.Serve(ln, s)
			log.G(context.WithoutCancel(ctx)).WithError(err).Error("the port-forward server stopped")
		}()
		log.G(ctx).WithField("address", cfg.Addr).Info("port-forward server for pods whose kind forwards ports started")
	})
	return f.server, f.err
}

// forwardRuntime is the streaming server's runtime: port-forward only.
type forwardRuntime struct{ f *portForwardFix }

func (r forwardRuntime) PortForward(ctx context.Context, id string, port int32, stream io.ReadWriteCloser) error {
	pf, ok := r.f.forwarder(id)
	if !ok {
		stream.Close()
		return fmt.Errorf("pod sandbox %q is not ready: %w", id, errdefs.ErrNotFound)
	}
	return pf.PortForward(ctx, port, stream)
}

// Exec and Attach are CRI's streaming server's: ours hands out no such URL.
func (forwardRuntime) Exec(context.Context, string, []string, io.Reader, io.WriteCloser, io.WriteCloser, bool, <-chan remotecommand.TerminalSize) error {
	return errdefs.ErrNotImplemented
}

func (forwardRuntime) Attach(context.Context, string, io.Reader, io.WriteCloser, io.WriteCloser, bool, <-chan remotecommand.TerminalSize) error {
	return errdefs.ErrNotImplemented
}
