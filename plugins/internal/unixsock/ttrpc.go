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
	"google.golang.org/grpc/status"
)

// NewServer returns the ttrpc server every helper of containerd-kuasar
// serves its API with: only clients of the server's own user are admitted,
// errors cross the wire with their errdefs class (errgrpc codes), and a
// panic in a call is that call's error, not the end of the server.
func NewServer(name string) (*ttrpc.Server, error) {
	return ttrpc.NewServer(ttrpc.WithServerHandshaker(sameUser{}), CallInterceptor(name))
}

// CallInterceptor makes a ttrpc server send errors with their errdefs class
// and turn a panic in a call into that call's error (Internal). NewServer
// uses it; a server on a transport without Unix credentials (the kuasar-vmm
// agent's channel) uses it alone.
func CallInterceptor(name string) ttrpc.ServerOpt {
	return ttrpc.WithUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.G(ctx).WithField("panic", r).WithField("method", info.FullMethod).
					WithField("stack", string(debug.Stack())).Error(name + " call panicked")
				resp, err = nil, errgrpc.ToGRPC(fmt.Errorf("%s internal error in %s: %v: %w", name, info.FullMethod, r, errdefs.ErrInternal))
			}
		}()
		resp, err = method(ctx, unmarshal)
		return resp, errgrpc.ToGRPC(err)
	})
}

// sameUser admits clients of the server's own user only (CheckPeer), on
// Unix connections, wrapped (see Unwrapper) or not.
type sameUser struct{}

// Unwrapper is a connection wrapping a *net.UnixConn, e.g. to count it.
type Unwrapper interface {
	Unwrap() net.Conn
}

func (sameUser) Handshake(_ context.Context, c net.Conn) (net.Conn, any, error) {
	inner := c
	for {
		w, ok := inner.(Unwrapper)
		if !ok {
			break
		}
		inner = w.Unwrap()
	}
	uc, ok := inner.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("a unix socket connection is required, not %T", inner)
	}
	if err := CheckPeer(uc); err != nil {
		return nil, nil, err
	}
	return c, nil, nil
}

// Serve serves srv on l until ctx is done. It returns once srv is closed,
// its listener and every client connection with it.
func Serve(ctx context.Context, srv *ttrpc.Server, l net.Listener) error {
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	select {
	case <-ctx.Done():
		srv.Close()
		<-served
		return nil
	case err := <-served:
		srv.Close()
		if errors.Is(err, ttrpc.ErrServerClosed) {
			return nil
		}
		return err
	}
}

// Dial connects a ttrpc client to a helper's socket; onClose runs once the
// connection is gone. Errors of calls carry grpc codes: Native turns them
// back into errdefs classes.
func Dial(ctx context.Context, socket string, onClose func()) (*ttrpc.Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	return NewClient(c, onClose), nil
}

// NewClient makes a ttrpc client on an established connection (a socket,
// or a kuasar-vmm channel session); onClose runs once it is gone. Errors of
// calls carry grpc codes: Native turns them back into errdefs classes.
func NewClient(c net.Conn, onClose func()) *ttrpc.Client {
	var opts []ttrpc.ClientOpts
	if onClose != nil {
		opts = append(opts, ttrpc.WithOnClose(onClose))
	}
	return ttrpc.NewClient(c, opts...)
}

// Native returns the error of a ttrpc call with its errdefs class restored.
// Errors that never crossed the wire (a closed connection) are returned as
// they are.
func Native(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); !ok {
		return err
	}
	return errgrpc.ToNative(err)
}

// IsClosed reports whether err says the connection to the server is gone
// (the call may or may not have reached it).
func IsClosed(err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, net.ErrClosed) || errdefs.IsUnavailable(err)
}
