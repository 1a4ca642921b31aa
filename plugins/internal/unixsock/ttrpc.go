package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
)

// NewServer returns the ttrpc server every helper of containerd-kuasar
// serves its API with: only clients of the server's own user are admitted,
// errors cross the wire with their errdefs class (errgrpc codes), and a
// panic in a call is that call's error, not the end of the server.
func NewServer(name string) (*ttrpc.Server, error) {
	return ttrpc.NewServer(ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()), CallInterceptor(name))
}

// CallInterceptor makes a ttrpc server send errors with their errdefs class
// and turn a panic in a call into that call's error. NewServer uses it; a
// server on a transport without Unix credentials (the kuasar-vmm agent's
// channel) uses it alone.
func CallInterceptor(name string) ttrpc.ServerOpt {
	return ttrpc.WithUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.G(ctx).WithField("panic", r).WithField("method", info.FullMethod).
					WithField("stack", string(debug.Stack())).Error(name + " call panicked")
				resp, err = nil, fmt.Errorf("%s internal error in %s: %v: %w", name, info.FullMethod, r, errdefs.ErrInternal)
			}
		}()
		resp, err = method(ctx, unmarshal)
		return resp, errgrpc.ToGRPC(err)
	})
}

// Serve serves srv on l until ctx is done, then closes srv and l.
func Serve(ctx context.Context, srv *ttrpc.Server, l net.Listener) error {
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.Serve(ctx, l)
	if errors.Is(err, ttrpc.ErrServerClosed) || ctx.Err() != nil {
		return nil
	}
	return err
}

// Dial connects a ttrpc client to a helper's socket. Errors of its calls
// come back with their errdefs class; onClose runs once the connection is
// gone.
func Dial(ctx context.Context, socket string, onClose func()) (*ttrpc.Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	return NewClient(c, onClose), nil
}

// NewClient makes a ttrpc client on an established connection (a socket,
// or a kuasar-vmm channel session), with Dial's error classes and onClose.
func NewClient(c net.Conn, onClose func()) *ttrpc.Client {
	opts := []ttrpc.ClientOpts{
		ttrpc.WithUnaryClientInterceptor(func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, _ *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
			return errgrpc.ToNative(invoke(ctx, req, resp))
		}),
	}
	if onClose != nil {
		opts = append(opts, ttrpc.WithOnClose(onClose))
	}
	return ttrpc.NewClient(c, opts...)
}

// IsClosed reports whether err says the connection to the server is gone
// (the call may or may not have reached it).
func IsClosed(err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, net.ErrClosed) || errdefs.IsUnavailable(err)
}
